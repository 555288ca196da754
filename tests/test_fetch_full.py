"""`covidcxr fetch` end to end at full size, against a loopback server (127.0.0.1 only; no internet).

The test rebuilds both upstream sources from every image of the shared development data, in their upstream
layouts and file types: the ieee8023 checkout (metadata.csv with upstream columns, images/), the
muhammedtalo/COVID-19 checkout (X-Ray Image DataSet/<folder>/<NIH name>.png) and NIH's Data_Entry_2017.csv
(2017 format, with rows for images outside the subset). It serves them from 127.0.0.1, runs the real command
`covidcxr fetch --base-url ... --nih-metadata URL`, and checks that the fetched dataset is the shared one: the
same rows and metadata, and the same images chosen by every recipe.
"""
import functools, os, shutil, subprocess, sys, threading, urllib.parse
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from covidcxr.core import data_root
from covidcxr.data import load_dataset, RECIPES
from covidcxr.fetch import SOURCES, NIH_DIR

DATA = data_root()
META = pd.read_csv(DATA/'metadata.csv', dtype=str, keep_default_na=False)

def upstream_name(url): return urllib.parse.unquote(url.rsplit('/', 1)[1])

def save_as_upstream(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    im = Image.open(src)
    if dst.suffix.lower() == '.png': im.save(dst, 'PNG', compress_level=1)
    else: im.save(dst, 'JPEG', quality=95)

def build_sources(root:Path):
    "Write both upstream archives and NIH's table under `root`, as github.com would serve them."
    up = root/'up'
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
        z = root/'srv'/SOURCES[s]['repo']/'archive'/f"{SOURCES[s]['commit']}.zip"; z.parent.mkdir(parents=True, exist_ok=True)
        shutil.make_archive(str(z.with_suffix('')), 'zip', up, top)
    # NIH's table in its 2017 format (a trailing empty column), with two rows for images outside the subset
    names = [upstream_name(u) for u in nih.url]
    de = pd.DataFrame({'Image Index': ['00000001_000.png'] + names + ['00030805_000.png'],
                       'Finding Labels': ['Cardiomegaly'] + nih.finding.tolist() + ['No Finding'], 'Follow-up #': 0,
                       'Patient ID': ['1'] + [p.split('-')[1] for p in nih.patient_id] + ['30805'],
                       'Patient Age': ['57'] + [str(int(float(a))) for a in nih.age] + ['39'],
                       'Patient Gender': ['M'] + nih.sex.tolist() + ['M'], 'View Position': ['PA'] + nih.view.tolist() + ['PA'],
                       'OriginalImage[Width': 1024, 'Height]': 1024, 'OriginalImagePixelSpacing[x': 0.143, 'y]': 0.143, '': ''})
    (root/'srv'/'nih').mkdir(); de.to_csv(root/'srv'/'nih'/'Data_Entry_2017.csv', index=False)
    shutil.rmtree(up)

@pytest.fixture(scope='module')
def fetched(tmp_path_factory):
    root = tmp_path_factory.mktemp('fetch-full')
    build_sources(root)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root/'srv'))
    handler.log_message = lambda *a: None
    srv = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{srv.server_address[1]}'
    env = {k:v for k,v in os.environ.items() if not k.startswith('COVIDCXR_FETCH_BASE') and k != 'COVIDCXR_NIH_METADATA'}
    r = subprocess.run([sys.executable, '-m', 'covidcxr.cli', 'fetch', '--dest', str(root/'data'), '--base-url', base,
                        '--nih-metadata', f'{base}/nih/Data_Entry_2017.csv'], capture_output=True, text=True, env=env, timeout=1200)
    srv.shutdown(); srv.server_close()
    yield root/'data', r
    shutil.rmtree(root, ignore_errors=True)

def test_fetch_exits_cleanly(fetched):
    out, r = fetched
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'prepared {len(META)} image(s)' in r.stdout, r.stdout
    assert 'skipped 0 file(s)' in r.stdout, r.stdout
    assert pd.read_csv(out/'skipped.csv').empty

def test_same_rows_and_metadata(fetched):
    out, _ = fetched
    got = pd.read_csv(out/'metadata.csv', dtype=str, keep_default_na=False)
    assert list(got.columns) == list(META.columns)
    assert got.file.tolist() == META.file.tolist()  # same rows, same order
    cols = ['label', 'finding', 'patient_id', 'source', 'view', 'sex', 'license', 'url']
    pd.testing.assert_frame_equal(got[cols], META[cols])
    np.testing.assert_array_equal(pd.to_numeric(got.age).values, pd.to_numeric(META.age).values)
    for f in got.file.sample(40, random_state=0):  # the pixels are the shared ones (one more JPEG round trip for ieee8023)
        a, b = (np.asarray(Image.open(d/f), float).ravel() for d in (out, DATA))
        assert np.corrcoef(a, b)[0, 1] > 0.99, f

@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipes_choose_the_same_images(fetched, recipe):
    out, _ = fetched
    mine, shared = (RECIPES[recipe](load_dataset(d)) for d in (out, DATA))
    assert mine[0].file.tolist() == shared[0].file.tolist()
    assert mine[1].reason.value_counts().to_dict() == shared[1].reason.value_counts().to_dict()
