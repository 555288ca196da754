"""covidcxr.external and `covidcxr evaluate --external`, on real films: the Hannover hospital's COVID-19 X-rays (one class,
never in the development data), a three-class model on a set lacking a class, labels the model does not know (excluded
and counted), the run's own test patients as negatives, and folders with no usable row (exit 2, one line).
Trains two tiny real runs (efficientnet_lite0, 64 px, one epoch: the plumbing, not accuracy): about a minute on 2 cores."""
import json, os
from pathlib import Path
import numpy as np, pandas as pd, pytest

pytestmark = pytest.mark.skipif(not os.environ.get('COVIDCXR_DATA'), reason='needs COVIDCXR_DATA (the shared X-rays)')


@pytest.fixture(scope='module')
def hannover():
    from covidcxr.core import data_root
    p = Path(os.environ.get('COVIDCXR_EXTERNAL', data_root().parent/'cxr-hannover'))
    if not (p/'metadata.csv').is_file(): pytest.skip(f'no external films at {p}')
    return p


def _run(tmp_path_factory, recipe):
    from covidcxr.run import train_run
    out = tmp_path_factory.mktemp('runs')/recipe
    train_run(recipe, arch='efficientnet_lite0', size=64, epochs=1, freeze_epochs=0, n_boot=200, report=False, out=out, log=lambda *a: None)
    return out

@pytest.fixture(scope='module')
def run2(tmp_path_factory): return _run(tmp_path_factory, 'covid_vs_normal_392')

@pytest.fixture(scope='module')
def run3(tmp_path_factory): return _run(tmp_path_factory, 'three_class')


def evaluate(capsys, *argv):
    "`covidcxr evaluate ...` in this process: (exit code, stdout, stderr)."
    from covidcxr.cli import main
    capsys.readouterr()
    code = main(['evaluate', *map(str, argv)])
    o = capsys.readouterr()
    return code, o.out, o.err


def relabelled(hannover, folder, n, label='tuberculosis'):
    "A dataset folder whose metadata.csv points at the real Hannover films (absolute paths), the first `n` relabelled."
    m = pd.read_csv(hannover/'metadata.csv', dtype=str)
    m['file'] = [str(hannover/f) for f in m.file]
    m.loc[m.index[:n], 'label'] = label
    folder.mkdir(parents=True, exist_ok=True); m.to_csv(folder/'metadata.csv', index=False)
    return folder, m


def test_hannover_single_class(run2, hannover, tmp_path, capsys):
    from covidcxr.data import load_dataset
    from covidcxr.learner import load_model
    from covidcxr.evaluate import predict_split, choose_threshold
    code, out, err = evaluate(capsys, '--model', run2, '--data', hannover, '--external', '--out', tmp_path/'ext')
    assert code == 0, err
    d = json.loads((tmp_path/'ext'/'metrics.json').read_text())
    assert (d['n_images'], d['n_patients'], d['n_excluded']) == (243, 71, 0)
    assert d['headline'] in out and '95% CI' in d['headline'] and 'patient bootstrap' in d['headline']
    assert out.splitlines()[0].startswith('One class only (covid)')
    # the threshold: chosen on the run's validation patients, predicted here independently
    learn = load_model(run2)
    sp = pd.read_csv(run2/'splits.csv', dtype=str)
    valid = load_dataset().merge(sp.loc[sp.split == 'valid', ['file', 'split']], on='file')
    p, t, _, _ = predict_split(learn, valid, 'valid')
    t_ = d['threshold']
    assert t_['value'] == pytest.approx(choose_threshold(p, t, learn.dls.vocab, 'covid', 0.95))
    assert (t_['chosen_on'], t_['n_patients'], t_['target_sensitivity']) == ('valid', valid.patient_id.nunique(), 0.95)
    [row] = d['per_source']
    assert (row['part'], row['source'], row['images'], row['patients'], row['at_threshold']['metric']) == ('external', 'hannover', 243, 71, 'sensitivity')
    s = d['at_threshold']['external']['sensitivity']
    assert s['ci_low'] <= s['value'] <= s['ci_high'] and s == {k: v for k, v in row['at_threshold'].items() if k != 'metric'}
    assert d['auc']['covid']['value'] is None and d['auc']['covid']['reason'] == 'undefined: only covid films; an AUC needs films of another class too'
    assert abs(sum(v['value'] for v in d['called_external'].values()) - 1) < 1e-9
    assert {'covid/ppv', 'covid/specificity', 'covid/auc'} <= set(d['metrics']['undefined'])
    assert [k for k, v in d['at_threshold']['all'].items() if v['value'] is None] == ['specificity', 'ppv', 'npv']
    html = (tmp_path/'ext'/'report.html').read_text()
    box = html.split('<section id="trust"')[1].split('</section>')[0]
    assert 'How far to trust this' in box and 'not a medical device' in box and 'covid sensitivity' in box


def test_unknown_labels_excluded_and_counted(run2, hannover, tmp_path, capsys):
    ds, m = relabelled(hannover, tmp_path/'tb', 30)
    code, out, err = evaluate(capsys, '--model', run2, '--data', ds, '--external', '--out', tmp_path/'out')
    assert code == 0, err
    d = json.loads((tmp_path/'out'/'metrics.json').read_text())
    assert d['n_images'] == 243 - 30 and d['n_excluded'] == 30
    [x] = d['excluded']
    assert (x['part'], x['label'], x['images'], x['patients']) == ('external', 'tuberculosis', 30, m.patient_id[:30].nunique())
    assert 'not a class of this model' in x['reason'] and '30 labelled tuberculosis' in out


def test_three_class_model_on_a_set_lacking_a_class(run3, hannover, tmp_path):
    from covidcxr.core import data_root
    from covidcxr.external import evaluate_external
    sp = pd.read_csv(run3/'splits.csv', dtype=str)
    normals = sp[(sp.split == 'test') & (sp.label == 'normal')]
    _, m = relabelled(hannover, tmp_path/'h', 0)
    (tmp_path/'mix').mkdir()
    pd.concat([m.head(40), normals.assign(file=[str(data_root()/f) for f in normals.file])[['file', 'label', 'patient_id', 'source', 'view']]]
              ).to_csv(tmp_path/'mix'/'metadata.csv', index=False)
    res = evaluate_external(run3, tmp_path/'mix', n_boot=300)
    assert set(res.rows.label) == {'covid', 'normal'} and res.metrics.n_images == 40 + len(normals)
    auc = res.auc()
    assert auc['pneumonia'] == dict(value=None, ci_low=None, ci_high=None, reason='undefined: no pneumonia films in this set')
    assert auc['covid']['value'] is not None and 'different sources' in auc['covid']['reason']
    assert np.isnan(res.metrics['pneumonia/sensitivity']['value'])
    assert res.caveats[0].startswith(f"{len(normals)} image(s) of {normals.patient_id.nunique()} patient(s) of the external set are in the run's splits.csv")
    assert any(c.startswith('The image sources differ by label') for c in res.caveats)
    assert 'No pneumonia films in this set: their sensitivity and AUC are undefined.' in res.caveats
    d = res.to_dict()
    assert set(d['sensitivity_external']) == {'covid', 'normal'}


def test_negatives_from_the_runs_test_patients(run2, hannover, tmp_path, capsys):
    from covidcxr.core import data_root
    code, out, err = evaluate(capsys, '--model', run2, '--data', hannover, '--external', '--negatives', f'{data_root()}:test',
                              '--out', tmp_path/'neg')
    assert code == 0, err
    assert out.splitlines()[0].startswith('The two parts differ by source as well as by label: external part covid 243 images of 71 patients from hannover')
    d = json.loads((tmp_path/'neg'/'metrics.json').read_text())
    sp = pd.read_csv(run2/'splits.csv', dtype=str); test = sp[sp.split == 'test']
    assert d['parts']['negatives']['images'] == (test.label != 'covid').sum()
    assert d['n_excluded'] == (test.label == 'covid').sum()                   # the split's own covid films: counted, not negatives
    assert {x['reason'] for x in d['excluded']} == {'covid is the positive class; the negatives add negatives only'}
    rows = {(r['part'], r['source'], r['label']): r for r in d['per_source']}
    assert rows[('external', 'hannover', 'covid')]['at_threshold']['metric'] == 'sensitivity'
    nih = rows[('negatives', 'nih-chestxray8', 'normal')]
    assert nih['at_threshold']['metric'] == 'specificity' and nih['at_threshold']['ci_low'] <= nih['at_threshold']['value'] <= nih['at_threshold']['ci_high']
    assert d['auc']['covid']['value'] is not None and 'different sources' in d['auc']['covid']['reason']
    assert d['caveats'][0].startswith('The two parts differ by source as well as by label')
    box = (tmp_path/'neg'/'report.html').read_text().split('<section id="trust"')[1].split('</section>')[0]
    assert 'The image sources differ by label' in box


def test_no_usable_row_exits_2_with_one_line(run2, hannover, tmp_path, capsys):
    (tmp_path/'nometa').mkdir()
    (tmp_path/'empty').mkdir(); (tmp_path/'empty'/'metadata.csv').write_text('')
    (tmp_path/'header').mkdir(); (tmp_path/'header'/'metadata.csv').write_text('file,label,patient_id\n')
    unknown, _ = relabelled(hannover, tmp_path/'unknown', 243)
    for folder, problem in [(tmp_path/'nowhere', 'no such folder'), (tmp_path/'nometa', 'needs a metadata.csv'),
                            (tmp_path/'empty', 'cannot be read as CSV'), (tmp_path/'header', 'metadata.csv lists no images'),
                            (unknown, 'no usable row: 243 image(s) labelled tuberculosis')]:
        code, out, err = evaluate(capsys, '--model', run2, '--data', folder, '--external', '--out', tmp_path/'o')
        assert code == 2 and len(err.strip().splitlines()) == 1, (folder, code, err)
        assert str(folder) in err and problem in err and 'Traceback' not in err, err
    assert not (tmp_path/'o').exists()
    assert evaluate(capsys, '--model', run2, '--data', hannover, '--negatives', hannover)[0] == 2          # --negatives needs --external
    assert evaluate(capsys, '--model', run2, '--data', hannover, '--external', '--split', 'valid')[0] == 2
    assert evaluate(capsys, '--model', run2, '--external')[0] == 2                                        # --external needs --data
    assert evaluate(capsys, '--model', run2, '--data', hannover, '--external', '--target-sensitivity', '1.5')[0] == 2
    assert evaluate(capsys, '--model', run2, '--data', hannover, '--external', '--dev-data', tmp_path/'nowhere')[0] == 3   # no dataset there


def test_evaluate_without_external_unchanged(run2, tmp_path, capsys):
    code, out, err = evaluate(capsys, '--model', run2, '--out', tmp_path/'plain')
    assert code == 0, err
    d = json.loads((tmp_path/'plain'/'metrics.json').read_text())
    assert d['split'] == 'test' and d['operating_point']['chosen_on'] == 'valid' and 'kind' not in d
    assert 'None in this report' in (tmp_path/'plain'/'report.html').read_text()
