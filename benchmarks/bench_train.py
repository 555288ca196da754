#!/usr/bin/env python
"""Throughput and memory figures for covidcxr on the 146-image recipe (a script that prints figures, not a test).

For each architecture and image size it measures, in a fresh Python process (so that the peak memory is that
configuration's own):
  - DataLoader throughput: images/s reading and augmenting the train split (`covidcxr.data.cxr_dls`),
  - training throughput: images/s over a few batches of `fit`, with the body frozen and unfrozen,
  - inference throughput: images/s of `learn.get_preds` on the valid split,
  - peak resident memory (`resource.getrusage(...).ru_maxrss`),
and prints the torch thread count and the device. On CUDA every timer waits for the GPU (`torch.cuda.synchronize()`)
before it reads the clock, so the figures are the work done, not the work queued; each configuration is measured with
mixed precision (fastai's `to_fp16`) on and off (`--amp`), with channels-last memory as `build_learner` sets it on
CUDA (`--channels-last off` to compare). On CPU, fastai's AMP does not apply (it autocasts on CUDA only): AMP is off.

Usage (from the repository root):
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_train.py            # 3 archs x 2 sizes
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_train.py --quick    # 1 arch, 1 size, < 1 min
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_train.py --presets  # each recipe's training preset, timed
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_train.py --amp both --channels-last off   # on a GPU

`--presets` trains each recipe's preset (`covidcxr.presets`) once on its train split, as `covidcxr train` does, and
prints the training seconds (CUDA synchronised around the timing where there is a GPU).

Architectures whose ImageNet weights are not on the machine are built with `pretrained=False` (random
initialisation, same compute) and the output says so. Weights are never downloaded unless `--online` is given.
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time

ARCHS = ('efficientnet_lite0', 'resnet18', 'resnet34')
SIZES = (128, 224)

def _peak_mib(who=resource.RUSAGE_SELF)->float:
    "Peak resident set size in MiB (ru_maxrss is in KiB on Linux, bytes on macOS)."
    r = resource.getrusage(who).ru_maxrss
    return r / 2**20 if sys.platform == 'darwin' else r / 1024

def _sync():
    "Wait for the GPU's queued work (no-op without CUDA): a timer read after it measures work done, not work queued."
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()

def _flag(v:str):
    "'on' -> True, 'off' -> False, 'auto' -> None (covidcxr's default: on for CUDA)."
    return {'on': True, 'off': False, 'auto': None}[v]

def bench_one(arch:str, size:int, bs:int, n_batches:int, data=None, seed:int=42, dl_epochs:int=2, infer_warmup:bool=True,
              amp:bool|None=None, channels_last:bool|None=None)->dict:
    "Measure one (arch, size, AMP, channels-last) configuration in this process; returns a dict of figures."
    import torch
    from fastai.callback.core import Callback, CancelFitException, CancelValidException
    from fastai.callback.fp16 import MixedPrecision
    from covidcxr.core import seed_everything, default_device
    from covidcxr.data import load_dataset, covid_vs_pneumonia_146, patient_split, cxr_dls
    from covidcxr.learner import build_learner, WeightsUnavailableError
    t_phase = time.perf_counter()
    seed_everything(seed)
    sel, _ = covid_vs_pneumonia_146(load_dataset(data), seed=seed)
    sp = patient_split(sel, seed=seed)
    dls = cxr_dls(sp, size=size, bs=bs, seed=seed)
    res = dict(arch=arch, size=size, bs=bs, n_train=int((sp.split == 'train').sum()), n_valid=int((sp.split == 'valid').sum()),
               torch_threads=torch.get_num_threads(), device=str(default_device()), num_workers=dls.train.fake_l.num_workers,
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    phase = {}
    def lap(name):
        nonlocal t_phase; _sync(); now = time.perf_counter(); phase[name] = round(now - t_phase, 1); t_phase = now
    lap('setup')  # load_dataset + recipe + split + cxr_dls

    # DataLoader: one warm-up epoch (file cache, lazy set-up), then timed epochs over the train split
    for _ in dls.train: pass
    _sync(); n, t0 = 0, time.perf_counter()
    for _ in range(dl_epochs):
        for xb, yb in dls.train: n += len(xb)
    _sync(); res['dl_img_s'] = n / (time.perf_counter() - t0); lap('dataloader')

    if amp and not torch.cuda.is_available(): raise SystemExit("--amp on needs CUDA: fastai's to_fp16 autocasts on CUDA only")
    kw = dict(fp16=amp, channels_last=channels_last)
    try:
        learn = build_learner(dls, arch, **kw); res['pretrained'] = True
    except WeightsUnavailableError:
        learn = build_learner(dls, arch, pretrained=False, **kw); res['pretrained'] = False
    res['weights'] = learn.weights_source
    res['amp'] = any(isinstance(c, MixedPrecision) for c in learn.cbs)
    res['channels_last'] = torch.device(dls.device).type == 'cuda' and channels_last is not False   # as build_learner applies it
    lap('build_learner')

    class _Timer(Callback):
        "Time `n` training batches after one warm-up batch; skip validation; stop the fit."
        order = 100
        def __init__(self, n): self.n, self.times, self.sizes = n, [], []
        def after_batch(self):
            if not self.training: return
            _sync(); self.times.append(time.perf_counter()); self.sizes.append(len(self.xb[0]))
            if len(self.times) > self.n: raise CancelFitException()
        def before_validate(self): raise CancelValidException()

    def train_speed(frozen:bool)->float:
        learn.freeze() if frozen else learn.unfreeze()
        cb = _Timer(n_batches)
        with learn.no_bar(), learn.no_logging(): learn.fit(100, 1e-4, cbs=cb)
        return sum(cb.sizes[1:]) / (cb.times[-1] - cb.times[0])

    res['train_frozen_img_s'] = train_speed(True); lap('train_frozen')
    res['train_unfrozen_img_s'] = train_speed(False); lap('train_unfrozen')

    if infer_warmup:
        with learn.no_bar(): learn.get_preds(dl=dls.valid)   # warm-up pass
    _sync(); t0 = time.perf_counter()
    with learn.no_bar(): p, _ = learn.get_preds(dl=dls.valid)   # get_preds returns CPU tensors: the GPU work is done
    _sync(); res['infer_img_s'] = len(p) / (time.perf_counter() - t0); lap('inference')
    res['phase_s'] = phase
    res['peak_rss_mib'] = _peak_mib()
    res['peak_rss_workers_mib'] = _peak_mib(resource.RUSAGE_CHILDREN)
    return res

def bench_preset(recipe:str, data=None, seed:int=42)->dict:
    "Train `recipe`'s preset once on its train split (validated on valid) and time it."
    import torch
    from covidcxr.data import load_dataset
    from covidcxr.presets import get_preset, recipe_split, train_preset
    sp, _ = recipe_split(load_dataset(data), recipe, seed=seed)
    p = get_preset(recipe)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync(); t0 = time.perf_counter()
    learn = train_preset(sp, p, seed=seed, log=lambda *a: None)
    sync(); secs = time.perf_counter() - t0
    n_train = int((sp.split == 'train').sum())
    return dict(recipe=recipe, arch=learn.arch, size=p.size, freeze_epochs=p.freeze_epochs, epochs=p.epochs, lr=str(p.lr),
                n_train=n_train, train_s=secs, img_s=n_train * (p.freeze_epochs + p.epochs) / secs,
                torch_threads=torch.get_num_threads(), device=str(learn.dls.device), peak_rss_mib=_peak_mib())

def presets_main(a)->int:
    from covidcxr.data import RECIPES
    load = os.getloadavg()
    print(f"covidcxr preset training time: each recipe's preset trained once on its train split (seed 42)")
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ('  (loaded: times are longer than on an idle machine; compare ratios within one run)' if load[0] > 1.5 else ''))
    for rec in a.recipes or list(RECIPES):
        cmd = [sys.executable, os.path.abspath(__file__), '--_preset', rec] + (['--data', a.data] if a.data else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0: print(f"{rec} FAILED:\n{p.stderr.strip()[-2000:]}", file=sys.stderr); return 1
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"preset {r['recipe']}: {r['arch']} {r['size']}px, {r['freeze_epochs']}+{r['epochs']} epochs at lr {r['lr']}, "
              f"{r['n_train']} training images: {r['train_s']:.0f} s ({r['img_s']:.1f} img/s, {r['torch_threads']} threads, "
              f"{r['device']}, peak {r['peak_rss_mib']:.0f} MiB)", flush=True)
    return 0

def _row(r):
    w = 'ImageNet' if r['pretrained'] else 'NONE (pretrained=False)'
    onoff = lambda v: 'on' if v else 'off'
    return (f"{r['arch']:<19}{r['size']:>5}{onoff(r['amp']):>5}{onoff(r['channels_last']):>7}{r['dl_img_s']:>10.1f}{r['train_frozen_img_s']:>10.1f}"
            f"{r['train_unfrozen_img_s']:>10.1f}{r['infer_img_s']:>10.1f}{r['peak_rss_mib']:>10.0f}   {w}")

def amp_settings(amp:str, cuda:bool)->list:
    "The AMP settings to measure: 'both' -> on and off; 'auto' -> both on CUDA, off on CPU; 'on' / 'off' -> that one."
    if amp == 'auto': return ['on', 'off'] if cuda else ['off']
    return ['on', 'off'] if amp == 'both' else [amp]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='one arch (efficientnet_lite0), one size (128), bs 8, 2 timed batches, 1 timed DataLoader epoch, no inference warm-up: < 1 minute')
    ap.add_argument('--archs', nargs='+', default=list(ARCHS))
    ap.add_argument('--sizes', nargs='+', type=int, default=list(SIZES))
    ap.add_argument('--bs', type=int, default=16, help='batch size (default 16, as in the notebooks)')
    ap.add_argument('--batches', type=int, default=5, help='timed training batches, after one warm-up batch')
    ap.add_argument('--dl-epochs', type=int, default=2, help='timed DataLoader epochs, after one warm-up epoch')
    ap.add_argument('--no-infer-warmup', action='store_true', help='time the first get_preds pass (no warm-up pass)')
    ap.add_argument('--data', default=None, help='dataset folder (default: $COVIDCXR_DATA, then ~/.covidcxr/data)')
    ap.add_argument('--online', action='store_true', help='allow weight downloads (default: COVIDCXR_OFFLINE=1)')
    ap.add_argument('-v', '--verbose', action='store_true', help='print the seconds each phase took')
    ap.add_argument('--json', default=None, help='also write the figures to this JSON file')
    ap.add_argument('--presets', action='store_true', help="time each recipe's training preset (one training each)")
    ap.add_argument('--recipes', nargs='+', help='with --presets: these recipes only (default: all)')
    ap.add_argument('--amp', choices=['auto', 'both', 'on', 'off'], default='auto',
                    help="mixed precision (fastai's to_fp16, CUDA only): auto = on and off on CUDA, off on CPU")
    ap.add_argument('--channels-last', choices=['auto', 'on', 'off'], default='auto',
                    help="channels-last memory format (CUDA only): auto = covidcxr's default, on for CUDA")
    ap.add_argument('--_one', nargs=2, metavar=('ARCH', 'SIZE'), help=argparse.SUPPRESS)
    ap.add_argument('--_preset', metavar='RECIPE', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.online: os.environ.setdefault('COVIDCXR_OFFLINE', '1')
    if a._preset: print(json.dumps(bench_preset(a._preset, a.data))); return 0
    if a.presets: return presets_main(a)
    if a._one:
        print(json.dumps(bench_one(a._one[0], int(a._one[1]), a.bs, a.batches, a.data, dl_epochs=a.dl_epochs, infer_warmup=not a.no_infer_warmup,
                                   amp=_flag(a.amp), channels_last=_flag(a.channels_last)))); return 0
    if a.quick: a.archs, a.sizes, a.batches, a.dl_epochs, a.bs, a.no_infer_warmup = ['efficientnet_lite0'], [128], 2, 1, 8, True

    import torch
    cuda = torch.cuda.is_available()
    if a.amp == 'on' and not cuda: print("--amp on needs CUDA: fastai's to_fp16 autocasts on CUDA only", file=sys.stderr); return 2
    load = os.getloadavg()
    print(f"covidcxr training benchmark: 146 recipe (covid_vs_pneumonia_146), patient split seed 42, bs={a.bs}, "
          f"{a.batches} timed training batches")
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ('  (the machine was loaded: figures are lower than on an idle machine)' if load[0] > 2 else ''))
    rows, t_all = [], time.perf_counter()
    for arch in a.archs:
        for size in a.sizes:
            for amp in amp_settings(a.amp, cuda):
                t0 = time.perf_counter()
                cmd = [sys.executable, os.path.abspath(__file__), '--_one', arch, str(size), '--bs', str(a.bs),
                       '--batches', str(a.batches), '--dl-epochs', str(a.dl_epochs), '--amp', amp, '--channels-last', a.channels_last] + (['--no-infer-warmup'] if a.no_infer_warmup else []) + (['--data', a.data] if a.data else []) + (['--online'] if a.online else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{arch} {size}px amp {amp} FAILED:\n{p.stderr.strip()[-2000:]}", file=sys.stderr); return 1
                r = json.loads(p.stdout.strip().splitlines()[-1]); r['wall_s'] = time.perf_counter() - t0
                if not rows:
                    print(f"torch threads: {r['torch_threads']}, device: {r['device']}" + (f" ({r['gpu']}, timings CUDA-synchronised)" if r['gpu'] else '')
                          + f", DataLoader workers: {r['num_workers']}, train split {r['n_train']} images, valid split {r['n_valid']} images\n")
                    print(f"{'arch':<19}{'size':>5}{'amp':>5}{'chlast':>7}{'load/s':>10}{'frozen/s':>10}{'unfroz/s':>10}{'infer/s':>10}{'peakMiB':>10}   weights")
                rows.append(r); print(_row(r), flush=True)
                if a.verbose: print('    seconds per phase:', r['phase_s'], f"(process {r['wall_s']:.0f}s)")
    print("\nimages/s: load = DataLoader reading + augmenting the train split; frozen / unfroz = training steps "
          "(forward, backward, optimiser, data included) with the body frozen / unfrozen; infer = get_preds on the "
          "valid split; peakMiB = peak resident memory of the process measuring that configuration (ru_maxrss); amp = fastai's "
          "to_fp16 mixed precision (CUDA only); chlast = channels-last memory format (CUDA only).")
    if any(not r['pretrained'] for r in rows):
        print("pretrained=False: ImageNet weights for " + ', '.join(sorted({r['arch'] for r in rows if not r['pretrained']}))
              + " are not on this machine; those rows use random initialisation (same compute, so the speeds hold).")
    print(f"total {time.perf_counter() - t_all:.0f}s")
    if a.json:
        with open(a.json, 'w') as f: json.dump(dict(load=load, rows=rows), f, indent=1)
    return 0

if __name__ == '__main__': sys.exit(main())
