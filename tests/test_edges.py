"Trustworthy at the edges (issue 10): config.json checked on a real saved model, files written with normal permissions, multi-page files treated alike, large images decoded reduced."
import hashlib, json, math, os, shutil
from pathlib import Path
import numpy as np, pytest
from PIL import Image
from covidcxr.cli import main
from covidcxr.dicom import read_cxr, CXRReadError, MultiFrameError, MAX_DECODE_PIXELS
from covidcxr.data import PILCXR
from covidcxr.test_utils import array_to_dicom
from covidcxr.learner import load_model, read_model_config, check_model_config, ModelConfigError

def _sha(folder:Path)->dict: return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

def _edited(model_dir:Path, tmp_path:Path, **changes)->Path:
    "A copy of the real saved model whose config.json has `changes` (a value of ... removes the field)."
    m = tmp_path/'model'; shutil.copytree(model_dir, m)
    cfg = json.loads((m/'config.json').read_text())
    for k, v in changes.items():
        if v is ...: cfg.pop(k)
        else: cfg[k] = v
    (m/'config.json').write_text(json.dumps(cfg))
    return m

BROKEN = [  # (field as named in the message, changes to config.json)
    ('arch', dict(arch='resnet9000')), ('arch', dict(arch=...)), ('arch', dict(arch=7)),
    ('vocab', dict(vocab=['covid'])), ('vocab', dict(vocab=['covid', 'covid'])), ('vocab', dict(vocab=['covid', ''])), ('vocab', dict(vocab=[])),
    ('n_in', dict(n_in=2)), ('size', dict(size=20000)), ('size', dict(size=0)), ('size', dict(size=64.5)), ('presize', dict(presize=8)),
    ('intensity', dict(intensity='gamma')), ('mean', dict(mean=['x'])), ('std', dict(std=[0.0])), ('std', dict(std=[-1.0])),
    ('std', dict(std=[0.5, 0.5])), ('temperature', dict(temperature=0)), ('temperature', dict(temperature=-2.0)),
    ('model_kwargs', dict(model_kwargs={'drop_rate': 0.5})), ('model_kwargs', dict(model_kwargs=['ps'])),
    ('model_kwargs.lin_ftrs', dict(model_kwargs={'lin_ftrs': [10**9]})), ('model_kwargs.ps', dict(model_kwargs={'ps': 2})),
]

@pytest.mark.parametrize('field,changes', BROKEN, ids=[f'{f}={list(c.values())[0]!r}'[:40] for f, c in BROKEN])
def test_config_field_checked(model_dir, tmp_path, field, changes):
    before = _sha(model_dir)
    m = _edited(model_dir, tmp_path, **changes)
    with pytest.raises(ModelConfigError) as e: load_model(m)
    msg = str(e.value)
    assert msg.startswith(f"{m/'config.json'}: field '{field}': ") and '\n' not in msg and len(msg) < 300, msg
    assert _sha(model_dir) == before  # the original model folder is never modified

def test_saved_config_passes_and_a_sane_edit_loads(model_dir, tmp_path):
    cfg = read_model_config(model_dir)
    assert check_model_config(dict(cfg)) == cfg
    learn = load_model(_edited(model_dir, tmp_path, temperature=2.0))
    assert learn.temperature == 2.0 and list(learn.dls.vocab) == cfg['vocab']

def test_cli_names_file_and_field(model_dir, tmp_path, shared, capsys):
    m = _edited(model_dir, tmp_path, arch=...)
    assert main(['predict', '--model', str(m), str(shared.path.iloc[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"covidcxr predict: error: {m/'config.json'}: field 'arch': missing", err
    (m/'config.json').write_text('{"arch": "efficientnet_lite0",\n "vocab": [')
    assert main(['predict', '--model', str(m), str(shared.path.iloc[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"covidcxr predict: error: {m/'config.json'}: not valid JSON at line 2") and '\n' not in err, err

def test_wrong_arch_is_one_short_line(model_dir, tmp_path):
    m = _edited(model_dir, tmp_path, arch='resnet18')
    with pytest.raises(ModelConfigError) as e: load_model(m)
    msg = str(e.value)
    assert msg.startswith(f"{m/'model.safetensors'}: the weights do not fit arch 'resnet18'") and len(msg) < 400, msg
    (m/'model.safetensors').write_bytes(b'not tensors')
    with pytest.raises(ModelConfigError, match='not a readable safetensors file'): load_model(m)

def test_model_files_have_normal_permissions(model_dir, tmp_path):
    (tmp_path/'ref').write_text(''); normal = (tmp_path/'ref').stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in model_dir.iterdir()} == {p.name: normal for p in model_dir.iterdir()}
    assert not [p for p in model_dir.iterdir() if p.name.startswith('.')]  # no temporary left behind

def test_multipage_tiff_refused_like_multiframe_dicom(tmp_path, shared):
    film = Image.open(shared.path.iloc[0]).convert('L'); film.thumbnail((256, 256))
    film.save(tmp_path/'pages.tif', save_all=True, append_images=[film])
    array_to_dicom(np.asarray(film), tmp_path/'frames.dcm', frames=2)
    errs = []
    for f in ('pages.tif', 'frames.dcm'):
        with pytest.raises(MultiFrameError) as e: read_cxr(tmp_path/f)
        errs.append(e.value)
    assert [e.reason.split(';')[0] for e in errs] == ['multi-frame: 2 pages in one TIFF file', 'multi-frame: 2 frames'], errs
    assert all('covidcxr reads single X-ray images' in e.reason and e.path.endswith(f) for e, f in zip(errs, ('pages.tif', 'frames.dcm')))
    film.save(tmp_path/'one.tif'); assert read_cxr(tmp_path/'one.tif').size == film.size  # a single-page TIFF is read

def test_large_16bit_png_decoded_reduced(tmp_path, shared):
    "A real film scaled up to 5000 x 5000 16-bit (over the 4096^2 budget) comes out reduced by 2, the same picture."
    film = Image.open(shared.path.iloc[0]).convert('L')
    big = np.asarray(film.resize((5000, 5000), Image.Resampling.BILINEAR)).astype(np.uint16) * 257
    Image.fromarray(big).save(tmp_path/'big16.png'); del big
    im = read_cxr(tmp_path/'big16.png')
    assert (im.mode, im.size, im.info['orig_size'], im.info['reduced_by']) == ('L', (2500, 2500), (5000, 5000), 2)
    assert im.size[0] * im.size[1] <= MAX_DECODE_PIXELS
    ref = np.asarray(film.resize((2500, 2500), Image.Resampling.BILINEAR), np.float64)
    assert np.corrcoef(np.asarray(im, np.float64).ravel(), ref.ravel())[0, 1] > 0.99
    assert PILCXR.create(tmp_path/'big16.png').size == (2500, 2500)  # the DataBlock's reader takes the same path

def test_large_png_full_size_pixels_freed_early(tmp_path, shared):
    "A real film as a 6000 x 6000 16-bit PNG: `read_cxr`'s peak memory (a fresh process) stays near one full-size decode, because the full-size pixels are freed before the 8-bit conversion (it was 3.1 decodes' worth)."
    import subprocess, sys
    film = Image.open(shared.path.iloc[0]).convert('L')
    big = np.asarray(film.resize((6000, 6000), Image.Resampling.BILINEAR)).astype(np.uint16) * 257
    Image.fromarray(big).save(tmp_path/'big16.png'); full_mb = big.nbytes / 2**20; del big
    if not Path('/proc/self/status').is_file(): pytest.skip('needs /proc (Linux)')
    code = ("from covidcxr.dicom import read_cxr\n"   # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
            "hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024\n"
            "m0 = hwm(); im = read_cxr(%r)\nprint(im.size[0], hwm() - m0)" % str(tmp_path/'big16.png'))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    side, mb = r.stdout.split()
    assert side == '3000' and float(mb) < 2.5 * full_mb, (mb, full_mb)
    print(f'read_cxr of a 6000 x 6000 16-bit PNG: {float(mb):.0f} MB over the baseline, {float(mb) / full_mb:.1f} full-size decodes')

def test_evaluate_out_checked_before_any_work(model_dir, tmp_path, capsys):
    (tmp_path/'a_file').write_text('x')
    for out, why in [('/proc/covidcxr-x', 'cannot write there'), (str(tmp_path/'a_file'), 'exists and is not a folder'),
                     (str(tmp_path/'a_file'/'sub'), 'is not a folder')]:
        assert main(['evaluate', '--model', str(model_dir), '--out', out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f'covidcxr evaluate: error: --out {out}: ') and why in err and '\n' not in err, err
    assert not [p for p in tmp_path.iterdir() if p.name != 'a_file']  # the probe left nothing behind
