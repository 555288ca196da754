"""covidcxr.report: a saved run evaluated end to end writes a self-contained report.html (every section, every
embedded image decodes, nothing fetched from elsewhere) and a metrics.json whose intervals contain their values.
Trains one small real model (efficientnet_lite0, 64 px, one epoch) on the 146 recipe: about a minute on 2 cores."""
import base64, io, json, os, re, shutil, subprocess, tempfile
from pathlib import Path
import pandas as pd, pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not os.environ.get('COVIDCXR_DATA'), reason='needs COVIDCXR_DATA (the shared X-rays)')
SECTIONS = ('model', 'data', 'metrics', 'plots', 'errors', 'notes')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    from covidcxr.core import seed_everything
    from covidcxr.data import load_dataset, covid_vs_pneumonia_146, patient_split, cxr_dls
    from covidcxr.learner import build_learner, fine_tune_cxr, save_model
    seed_everything(0)
    df = patient_split(covid_vs_pneumonia_146(load_dataset())[0], seed=42)
    learn = build_learner(cxr_dls(df, size=64, bs=16), 'efficientnet_lite0')
    fine_tune_cxr(learn, epochs=1, lr=2e-3, freeze_epochs=0)
    from covidcxr.run import split_id, SPLIT_DESCRIPTION
    run = tmp_path_factory.mktemp('runs')/'run146'
    sid = split_id(df)   # a run folder's model and metrics must come from one split (load_model checks)
    save_model(learn, run/'model', extra={'split_id': sid})
    df[['file', 'patient_id', 'label', 'split']].to_csv(run/'splits.csv', index=False)
    (run/'metrics.json').write_text(json.dumps({'split': {'split_id': sid, 'method': SPLIT_DESCRIPTION}}))
    return run


@pytest.fixture(scope='module')
def report(run_dir):
    from covidcxr.report import evaluate_run
    return evaluate_run(run_dir, split='test', n_boot=500, k=4)


def test_html_has_every_section_and_images_decode(report):
    html = report.read_text()
    for s in SECTIONS: assert f'<section id="{s}">' in html, s
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) >= 5
    for b in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b))); im.load()
        assert min(im.size) > 50
    body = re.sub(r'data:image/png;base64,[^"]+', '', html)
    assert not re.search(r'(src|href)="(https?:)?//', body)     # self-contained: nothing fetched
    assert 'by patient' in html and '95% CI' in html
    for s in ('Where the images come from', 'github.com/ieee8023/covid-chestxray-dataset at ', 'CC0 (NIH Clinical Center)',
              'ROC curve with its 95% band', 'Operating threshold'): assert s in html, s


def test_folder_holds_the_page_and_one_metrics_json(report):
    "write_report writes the page only; evaluate_run writes metrics.json once, whole: no temporary file is left beside them."
    assert sorted(os.listdir(report.parent)) == ['metrics.json', 'report.html']


def test_roc_band_is_about_covid_and_contains_the_curve(run_dir):
    "The ROC drawn is the operating point's class (covid), its patient-bootstrap band contains the curve, and its area is the AUC."
    import numpy as np
    from covidcxr.learner import load_model
    from covidcxr.data import load_dataset
    from covidcxr.evaluate import evaluate_learner, operating_point
    from covidcxr.report import roc_band, plot_roc_band
    df = load_dataset().merge(pd.read_csv(run_dir/'splits.csv')[['file', 'split']], on='file')
    learn = load_model(run_dir)
    res = evaluate_learner(learn, df, 'test', n_boot=300)
    operating_point(evaluate_learner(learn, df, 'valid', n_boot=10), res, 'covid', 0.95)
    b = roc_band(res, 'covid')
    assert (b.ci_low <= b.tpr).all() and (b.tpr <= b.ci_high).all() and (np.diff(b.tpr) >= 0).all()
    assert abs(np.trapezoid(b.tpr, b.fpr) - res['covid/auc']['value']) < 0.03
    assert b.ci_high.sub(b.ci_low).iloc[1:-1].max() > 0      # a real interval, not a line
    assert plot_roc_band(res).axes[0].get_title().startswith('ROC of covid vs rest')


def test_numbers_people_read():
    "Learning rates as people write them, not float noise."
    from covidcxr.report import fmt_number
    assert [fmt_number(x) for x in (0.0020000001, 0.0005011872272007167, 3.31418, 12)] == ['2e-3', '5.01e-4', '3.31', '12']


def test_metrics_json(report, run_dir):
    d = json.loads((report.parent/'metrics.json').read_text())
    sp = pd.read_csv(run_dir/'splits.csv')
    t = sp[sp.split == 'test']
    assert (d['split'], d['n_images'], d['n_patients']) == ('test', len(t), t.patient_id.nunique())
    assert {'accuracy', 'macro_auc', 'ece', 'covid/sensitivity', 'covid/ppv', 'covid/prevalence'} <= set(d['metrics'])
    for k, v in d['metrics'].items():
        assert set(v) == {'value', 'ci_low', 'ci_high'}, k
        assert v['ci_low'] <= v['value'] <= v['ci_high'], k
    op = d['operating_point']
    assert op['chosen_on'] == 'valid' and op['reported_on'] == 'test'
    for v in op['metrics'].values(): assert v['ci_low'] <= v['value'] <= v['ci_high']


def test_within_source_auc_in_report_and_metrics_json(run_dir, tmp_path):
    """Held-out ieee8023 films of both classes: the page has the within-source table (with why it matters), metrics.json the same
    figures, equal to scikit-learn's AUC on that source's rows; the test split, where no source holds both, says why."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from covidcxr.core import data_root, fmt_ci
    from covidcxr.data import load_dataset
    from covidcxr.evaluate import predict_split, WITHIN_SOURCE_WHY
    from covidcxr.learner import load_model
    from covidcxr.report import evaluate_run, headline_line
    run = tmp_path/'run'; shutil.copytree(run_dir, run)
    sp, df = pd.read_csv(run/'splits.csv'), load_dataset()
    ieee = df[(df.source == 'ieee8023') & df.label.isin(['covid', 'pneumonia']) & ~df.patient_id.isin(set(sp.patient_id))]
    held = pd.concat([ieee[ieee.label == 'covid'].head(20), ieee[ieee.label == 'pneumonia'].head(20)])
    pd.concat([sp, held[['file', 'patient_id', 'label']].assign(split='heldout')]).to_csv(run/'splits.csv', index=False)
    rep = evaluate_run(run, split='heldout', n_boot=300, cam=None, k=2)
    d, html = json.loads((rep.parent/'metrics.json').read_text()), rep.read_text()
    e = d['within_source']['sources']['ieee8023']
    assert e['undefined'] is None and list(e['auc']) == ['covid vs pneumonia']
    assert {c: v['images'] for c, v in e['by_class'].items()} == {'covid': 20, 'pneumonia': (held.label == 'pneumonia').sum()}
    probs, targets, rows, _ = predict_split(load_model(run), held.assign(path=[str(data_root()/f) for f in held.file]), None)
    a = e['auc']['covid vs pneumonia']
    assert a['value'] == pytest.approx(roc_auc_score(targets == 1, probs[:, 1])) and a['ci_low'] <= a['value'] <= a['ci_high']
    sec = html.split('<section id="within-source">')[1].split('</section>')[0]
    assert WITHIN_SOURCE_WHY in sec and fmt_ci(a, label='') in sec and 'covid 20' in sec
    assert f"within ieee8023: covid vs pneumonia AUC {fmt_ci(a)}" in headline_line(d)   # what `covidcxr evaluate` prints
    assert 'Within one source' in d['how_far_to_trust']
    t = json.loads((evaluate_run(run_dir, split='test', n_boot=50, cam=None, k=2).parent/'metrics.json').read_text())
    assert all(v['undefined'].startswith('undefined: ') for v in t['within_source']['sources'].values())


def test_missing_file_reported_not_dropped_silently(run_dir, tmp_path):
    from covidcxr.report import evaluate_run
    bad = tmp_path/'run'; shutil.copytree(run_dir, bad)
    sp = pd.read_csv(bad/'splits.csv'); i = sp.index[sp.split == 'test'][0]
    sp.loc[i, 'file'] = 'images/nowhere/missing.jpg'; sp.to_csv(bad/'splits.csv', index=False)
    with pytest.warns(UserWarning, match='missing.jpg'):
        rep = evaluate_run(bad, split='test', n_boot=100, cam=None, k=2)
    d = json.loads((rep.parent/'metrics.json').read_text())
    assert d['skipped_files'][0]['file'].endswith('missing.jpg') and 'not found' in d['skipped_files'][0]['reason']
    assert d['n_images'] == (sp.split == 'test').sum() - 1
    assert 'missing.jpg' in rep.read_text()


def test_clear_errors(run_dir):
    from covidcxr.report import evaluate_run
    with pytest.raises(ValueError, match="no rows in split 'train2'"): evaluate_run(run_dir, split='train2')
    with pytest.raises(FileNotFoundError, match='no splits.csv'): evaluate_run(run_dir/'model')


@pytest.mark.skipif(not shutil.which('chromium'), reason='chromium not installed')
def test_browser_renders_every_section(report):
    prof = tempfile.mkdtemp()
    r = subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
                        '--disable-background-networking', '--disable-component-update', '--disable-sync',
                        f'--user-data-dir={prof}', '--dump-dom', report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    dom = r.stdout
    for s in SECTIONS: assert f'id="{s}"' in dom, s
    assert dom.count('<img') >= 5
    shutil.rmtree(prof, ignore_errors=True)
