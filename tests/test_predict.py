"""`covidcxr.predict` on real shared films: the exported ONNX model against the PyTorch model (classes, probabilities,
the guard), the `export` / `predict --engine onnx` / `serve --engine onnx` commands, what each engine imports, and the
PyTorch engine (no fastai) against the fastai path it replaced."""
import hashlib, io, json, shutil, signal, subprocess, sys, urllib.request
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image

EXE = Path(sys.executable).parent/'covidcxr'
CMD = [str(EXE)] if EXE.exists() else [sys.executable, '-m', 'covidcxr.cli']

def cli(*args):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True, timeout=300)

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tiny_learner):
    "A run-like folder: a tiny EfficientNet-Lite0 (64 px, 1 epoch, 24 real films), calibrated, with its guard, as `covidcxr train` saves it."
    from covidcxr.learner import save_model, calibrate
    from covidcxr.guard import OODGuard
    learn = tiny_learner(12, (0.75, 0.25, 0.), 3)
    with learn.no_bar(), learn.no_logging(): calibrate(learn)
    run = tmp_path_factory.mktemp('pred')/'run'
    OODGuard.fit(learn).save(save_model(learn, run/'model'))
    (run/'metrics.json').write_text(json.dumps(dict(split=dict(method='by patient', split_id=None))))
    return run

@pytest.fixture(scope='module')
def films(shared, tmp_path_factory):
    "48 real films (16 of each label, from both sources, in their original sizes), a photograph, a blank image and a corrupt file."
    d = tmp_path_factory.mktemp('films')
    for l in ('covid', 'pneumonia', 'normal'):
        for f in shared[shared.label == l].sample(16, random_state=0).path: shutil.copy(f, d/f'{l}_{Path(f).name}')
    Image.fromarray(__import__('skimage.data').data.chelsea()).save(d/'cat.png')
    Image.new('L', (400, 400), 200).save(d/'blank.png')
    (d/'corrupt.jpg').write_bytes(Path(shared.path.iloc[0]).read_bytes()[:700])
    return d

@pytest.fixture(scope='module')
def histeq_model(tmp_path_factory, shared):
    "A model folder trained with a border crop and histogram equalisation: `train_preset` (EfficientNet-Lite0, 64 px, 1 epoch, 24 real films), with its guard."
    from covidcxr.data import patient_split
    from covidcxr.presets import TrainPreset, train_preset
    from covidcxr.learner import save_model
    from covidcxr.guard import OODGuard
    small = pd.concat([shared[shared.label == l].drop_duplicates('patient_id').head(12) for l in ('covid', 'pneumonia')])
    small = patient_split(small, pcts=(0.75, 0.25, 0.), seed=3)
    preset = TrainPreset(arch='efficientnet_lite0', fallback_arch=None, size=64, freeze_epochs=0, epochs=1, border=0.1, intensity='histeq')
    learn = train_preset(small, preset, log=lambda *a: None)
    mdir = save_model(learn, tmp_path_factory.mktemp('histeq')/'model')
    OODGuard.fit(learn).save(mdir)
    return mdir

def _hashes(d): return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

def test_onnx_matches_pytorch_on_real_films(run_dir, films):
    "The acceptance test: same classes, probabilities within 1e-4, the same guard verdicts and errors, file by file."
    from covidcxr.predict import export_onnx, load_engine, predict_files
    before = _hashes(films)
    export_onnx(run_dir)
    pt = predict_files(load_engine(run_dir, 'torch'), [films], bs=16)
    po = predict_files(load_engine(run_dir, 'onnx'), [films], bs=7)   # another batch size: the batch axis is free
    assert len(pt) == len(po) == 51
    pd.testing.assert_frame_equal(po[['file', 'predicted', 'error', 'not_classified']], pt[['file', 'predicted', 'error', 'not_classified']])
    ok = pt.error.eq('') & pt.not_classified.eq('')
    assert ok.sum() >= 40, pt[~ok]   # most real films are classified: the comparison is on real outputs
    d = np.abs(po[ok].filter(like='prob_').values - pt[ok].filter(like='prob_').values).max()
    assert d <= 1e-4, d
    assert pt[pt.file.str.endswith('corrupt.jpg')].error.iloc[0].startswith('truncated or corrupt')
    assert pt[pt.file.str.endswith('blank.png')].not_classified.iloc[0].startswith('not classified: nearly constant')
    assert po[po.file.str.endswith('cat.png')].not_classified.iloc[0].startswith('not classified: a colour image')   # the cheap check, both engines
    assert _hashes(films) == before   # no input file is modified
    print(f'{ok.sum()} real films classified by both engines; max probability difference {d:.1e}')

def test_export_and_predict_commands(run_dir, films, tmp_path):
    "`covidcxr export` then `covidcxr predict --engine onnx`: the CSV of the PyTorch engine; refusals exit 2 with the reason."
    r = cli('export', '--model', run_dir, '--format', 'onnx')
    assert r.returncode == 0 and 'model.onnx' in r.stdout, r.stderr
    assert not list((run_dir/'model').glob('.model.onnx.*'))   # no temporary file left
    for eng in ('torch', 'onnx'):
        r = cli('predict', '--model', run_dir, '--engine', eng, films, '--out', tmp_path/f'{eng}.csv')
        assert r.returncode == 0 and 'predicted ' in r.stderr and 'not classified' in r.stderr, r.stderr
    t, o = (pd.read_csv(tmp_path/f'{e}.csv', keep_default_na=False) for e in ('torch', 'onnx'))
    pd.testing.assert_frame_equal(o[['file', 'predicted', 'error', 'not_classified']], t[['file', 'predicted', 'error', 'not_classified']])
    # a model the ONNX path cannot reproduce (CLAHE) is refused, naming the file, and nothing is written
    odd = tmp_path/'odd'; shutil.copytree(run_dir/'model', odd); (odd/'model.onnx').unlink()
    cfg = json.loads((odd/'config.json').read_text()); cfg['intensity'] = 'clahe'; (odd/'config.json').write_text(json.dumps(cfg))
    r = cli('export', '--model', odd)
    assert r.returncode == 2 and f"{odd/'config.json'}: intensity normalisation 'clahe' is not reproduced" in r.stderr, r.stderr
    assert not (odd/'model.onnx').exists() and not list(odd.glob('.model.onnx.*'))
    r = cli('predict', '--model', odd, '--engine', 'onnx', films)
    assert r.returncode == 2 and 'covidcxr export --model' in r.stderr, r.stderr

def test_serve_onnx(run_dir, films):
    "`covidcxr serve --engine onnx`: says it has no Grad-CAM, answers a real film as `predict --engine onnx` does."
    from covidcxr.predict import export_onnx
    if not (run_dir/'model'/'model.onnx').is_file(): export_onnx(run_dir)
    f = sorted(films.glob('covid_*'))[0]
    p = subprocess.Popen(CMD + ['serve', '--model', str(run_dir), '--port', '0', '--engine', 'onnx'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert 'with ONNX Runtime (no Grad-CAM overlay' in line and ' at http://127.0.0.1:' in line, line + p.stderr.read()
        url = line.split(' at ')[1].split()[0]
        req = urllib.request.Request(url + 'predict?name=' + f.name, data=f.read_bytes(), method='POST')
        with urllib.request.urlopen(req, timeout=60) as r: got = json.loads(r.read())
    finally:
        p.send_signal(signal.SIGINT); out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err
    ref = cli('predict', '--model', run_dir, '--engine', 'onnx', f)
    want = pd.read_csv(io.StringIO(ref.stdout), keep_default_na=False).iloc[0]
    if want.not_classified: assert got['classified'] is False and got['reason'] == want.not_classified
    else:
        assert got['predicted'] == want.predicted and got['cam_png'] is None
        assert abs(got['probabilities']['covid'] - float(want.prob_covid)) < 1e-6

HEAVY = ('torch', 'fastai')

def _imports_heavy(code:str)->list:
    r = subprocess.run([sys.executable, '-c', code + f"\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()

def test_onnx_engine_imports_no_torch(run_dir, films):
    "Predicting with the ONNX engine loads neither torch nor fastai; nor do the modules it reads and checks films with."
    from covidcxr.predict import export_onnx
    if not (run_dir/'model'/'model.onnx').is_file(): export_onnx(run_dir)
    assert _imports_heavy(f"from covidcxr.predict import load_engine, predict_files\n"
                          f"assert len(predict_files(load_engine({str(run_dir)!r}, 'onnx'), [{str(films)!r}])) == 51") == []
    for m in ('covidcxr.predict', 'covidcxr.core', 'covidcxr.dicom'): assert _imports_heavy(f'import {m}') == [], m
    # guard hands on dicom's image_checks; PILCXR is covidcxr.data's alone (data sits above dicom)
    assert _imports_heavy('from covidcxr.data import PILCXR; from covidcxr.guard import image_checks; import covidcxr.dicom as d\n'
                          'assert image_checks is d.image_checks and PILCXR.__module__ == "covidcxr.data" and not hasattr(d, "PILCXR")') == list(HEAVY)

def test_onnx_reproduces_border_crop_and_histeq(histeq_model, films):
    "A model trained with `border=0.1, intensity='histeq'`: both steps recorded in the ONNX metadata, and the same classes, verdicts and errors as PyTorch, probabilities within 1e-4."
    import onnx
    from covidcxr.predict import export_onnx, load_engine, predict_files
    cfg = json.loads((histeq_model/'config.json').read_text())
    assert (cfg['border'], cfg['intensity']) == (0.1, 'histeq')
    meta = json.loads({p.key: p.value for p in onnx.load(export_onnx(histeq_model)).metadata_props}['covidcxr'])
    assert (meta['border'], meta['intensity']) == (0.1, 'histeq')
    pt = predict_files(load_engine(histeq_model, 'torch'), [films], bs=16)
    po = predict_files(load_engine(histeq_model, 'onnx'), [films], bs=5)
    pd.testing.assert_frame_equal(po[['file', 'predicted', 'error', 'not_classified']], pt[['file', 'predicted', 'error', 'not_classified']])
    ok = pt.error.eq('') & pt.not_classified.eq('')
    assert ok.sum() >= 24, pt[~ok]   # at least half of the 48 real films are classified: the comparison is on real outputs
    d = np.abs(po[ok].filter(like='prob_').values - pt[ok].filter(like='prob_').values).max()
    assert d <= 1e-4, d
    print(f'border 0.1 + histeq: {ok.sum()} real films classified by both engines; max probability difference {d:.1e}')

def _fastai_path(folder, files):
    "What the PyTorch engine computed before it ran without fastai: `load_model`, the learner's `test_dl`, `get_preds` (with its temperature), the guard on the features of the same pass."
    from covidcxr.learner import load_model
    from covidcxr.guard import OODGuard, capture_features
    learn, guard = load_model(folder), OODGuard.load(folder)
    with capture_features(learn.model) as feats, learn.no_bar():
        p, _ = learn.get_preds(dl=learn.dls.test_dl(pd.DataFrame({'path': [str(f) for f in files]}), rm_type_tfms=0))
    return p.numpy(), guard.check(np.concatenate(feats))

@pytest.mark.parametrize('model', ['run_dir', 'histeq_model'])
def test_torch_engine_matches_fastai_path(model, films, request):
    "The lean PyTorch engine (no fastai) against the fastai path it replaces, on the 48 real films: same classes and guard verdicts, probabilities within 1e-4."
    from covidcxr.predict import load_engine, predict_files
    m = request.getfixturevalue(model)
    got = predict_files(load_engine(m, 'torch'), [films], bs=16)
    seen = got[got.error.eq('') & (got.not_classified.eq('') | got.not_classified.str.contains('does not look like a frontal chest'))]
    assert len(seen) == 48, got   # the 48 real films pass the cheap checks: the network sees every one of them
    want, why = _fastai_path(m, seen.file)
    assert [w or '' for w in why] == seen.not_classified.tolist()   # the guard's verdicts, film by film
    ok = seen.not_classified.eq('').values
    assert ok.sum() >= 24, seen   # most are classified: the comparison is on real outputs
    vocab = load_engine(m).vocab
    assert seen.predicted[ok].tolist() == [vocab[i] for i in want[ok].argmax(1)]
    d = float(np.abs(seen[ok].filter(like='prob_').values - want[ok]).max())
    assert d <= 1e-4, d
    print(f'{model}: {ok.sum()} real films classified, {(~ok).sum()} refused by the guard; max probability difference lean vs fastai {d:.1e}')

def test_torch_engine_imports_no_fastai(run_dir, films):
    "`predict` with the PyTorch engine (the default) loads torch, never fastai; and torch only once the first batch is decoded."
    code = (f"import sys\nfrom covidcxr.predict import load_engine, predict_files\ne = load_engine({str(run_dir)!r})\n"
            f"assert 'torch' not in sys.modules\nassert len(predict_files(e, [{str(films)!r}])) == 51")
    assert _imports_heavy(code) == ['torch']
