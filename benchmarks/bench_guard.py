#!/usr/bin/env python
"""How well the "is this a frontal chest X-ray?" guard separates chest films from everything else (figures, not a test).

For a run folder (`covidcxr train --out RUN`, which saves the guard with the model) it scores, exactly as
`covidcxr predict` does (the cheap image checks, then the nearest-neighbour score against the threshold set on
the run's validation films):
  - real chest films that must pass: every frontal film of the development data (COVIDCXR_DATA), and the external
    hospital's films (--external, e.g. ../shared/data/cxr-hannover), counted separately;
  - things that must be rejected: scikit-image's bundled photographs and scanned pages, the run's own plots
    (pictures of charts, like screenshots), screenshots of the run's report and of the upload page when a headless
    Chromium is installed, blank images and noise;
  - lateral views of the development data, reported on their own (the guard is not built to tell views apart).

Usage: COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_guard.py RUN [--external DIR]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image

def screenshots(run:Path, tmp:Path)->list:
    "PNG screenshots of the run's report.html and of the upload page's HTML, if a headless Chromium is installed."
    exe = next((shutil.which(c) for c in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(c)), None)
    if exe is None: return []
    from covidcxr.serve import model_card, page_html
    pages = {'report': run/'report.html', 'page': tmp/'page.html'}
    pages['page'].write_text(page_html(model_card(run)))
    out = []
    for name, html in pages.items():
        if not html.is_file(): continue
        png = tmp/f'shot_{name}.png'
        subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', f'--screenshot={png}', '--window-size=1280,900',
                        html.resolve().as_uri()], capture_output=True, timeout=120)
        if png.is_file(): out.append((f'screenshot of {name}', png))
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('run', help='a run folder (covidcxr train --out)')
    ap.add_argument('--external', help='another dataset folder of real chest films that must pass (e.g. cxr-hannover)')
    ap.add_argument('--data', help='development dataset (default: $COVIDCXR_DATA)')
    a = ap.parse_args(argv)
    from covidcxr.data import load_dataset
    from covidcxr.learner import load_model
    from covidcxr.guard import OODGuard
    from covidcxr.predict import predict_files
    run = Path(a.run)
    learn, guard = load_model(run), OODGuard.load(run)
    if guard is None: sys.exit(f'{run}: no guard saved with this model (train it again with this version)')
    tmp = Path(tempfile.mkdtemp(prefix='covidcxr-bench-guard-'))
    skd = __import__('skimage.data').data
    negs = []
    for name in ('astronaut', 'camera', 'chelsea', 'coffee', 'rocket', 'text', 'page', 'clock', 'coins', 'moon', 'horse',
                 'brick', 'grass', 'gravel', 'hubble_deep_field', 'immunohistochemistry', 'retina', 'motorcycle_left', 'logo'):
        try: arr = getattr(skd, name)()
        except Exception: continue
        if arr.dtype == bool: arr = arr.astype(np.uint8) * 255
        if arr.ndim == 3 and arr.shape[2] == 4: arr = arr[..., :3]
        p = tmp/f'skimage_{name}.png'; Image.fromarray(arr.astype(np.uint8)).save(p); negs.append((f'photo/page: skimage {name}', p))
    for stem in ('roc', 'losses', 'confusion', 'reliability', 'lr_find', 'top_losses'):
        if (run/f'{stem}.png').is_file(): negs.append((f'chart: {stem}.png', run/f'{stem}.png'))
    negs += screenshots(run, tmp)
    rng = np.random.default_rng(0)
    for name, arr in [('blank black', np.zeros((512, 512), np.uint8)), ('blank white', np.full((512, 512), 255, np.uint8)),
                      ('blank grey', np.full((512, 400), 128, np.uint8)), ('uniform noise', rng.integers(0, 256, (512, 512))),
                      ('gaussian noise', np.clip(rng.normal(128, 40, (512, 512)), 0, 255)), ('1x1 pixel', np.full((1, 1), 200)),
                      ('gradient', np.add.outer(np.arange(512), np.arange(512)) // 4)]:
        p = tmp/f"{name.replace(' ', '_')}.png"; Image.fromarray(np.asarray(arr).astype(np.uint8)).save(p); negs.append((name, p))
    dev = load_dataset(a.data)
    sets = {'development films, frontal': dev[dev.view != 'L'].path.tolist(), 'development films, lateral': dev[dev.view == 'L'].path.tolist()}
    if a.external: sets['external films (' + Path(a.external).name + ')'] = load_dataset(a.external).path.tolist()
    t0 = time.time()
    load = os.getloadavg()[0]
    print(f"guard of {run}: {guard!r}; rule: {guard.info.get('threshold_rule')}; load average {load:.1f} on {os.cpu_count()} CPUs")
    res = predict_files(learn, [p for _, p in negs], guard=guard)
    rej = res.not_classified != ''
    print(f"\nnot chest films: {int(rej.sum())} of {len(res)} rejected ({rej.mean():.1%})")
    for (name, _), (_, r) in zip(negs, res.iterrows()):
        print(f"  {'rejected' if r.not_classified else 'PASSED  '}  {name}: {r.not_classified or ('called ' + r.predicted)}")
    for name, paths in sets.items():
        r = predict_files(learn, paths, guard=guard)
        n_rej = int((r.not_classified != '').sum())
        print(f"\n{name}: {n_rej} of {len(r)} rejected ({n_rej / len(r):.1%})" + (f"; unreadable {int((r.error != '').sum())}" if (r.error != '').any() else ''))
    print(f"\n({time.time() - t0:.0f} s)")
    shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__': main()
