"""`covidcxr audit` end to end through `covidcxr.cli.main` (moved here from nbs/08a_audit, which tests the library):
exit codes, what is printed, and audit.json, on real films of the shared data. No source check (no feature
extractor): seconds."""
import contextlib, io, json, os
import numpy as np, pandas as pd, pytest

pytestmark = pytest.mark.skipif(not os.environ.get('COVIDCXR_DATA'), reason='needs COVIDCXR_DATA (the shared X-rays)')


def _audit(*args):
    "Run `covidcxr audit ARGS`: (exit code, stdout, stderr)."
    from covidcxr.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(['audit', *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_leaky_splits_are_found_and_written(shared, tmp_path):
    "An image-level split of patients with several films: the patients in two splits are printed and in audit.json."
    multi = shared[shared.patient_id.map(shared.patient_id.value_counts()) >= 3].head(60)
    leaky = multi.assign(split=np.resize(['train', 'valid', 'test'], len(multi)))   # a patient's films spread over splits
    leaky[['file', 'patient_id', 'label', 'split']].to_csv(tmp_path/'leaky.csv', index=False)
    code, out, _ = _audit('--recipe', 'three_class', '--splits', tmp_path/'leaky.csv', '--no-source-check', '--out', tmp_path/'a')
    assert code == 0
    assert 'LEAKAGE' in out and f"wrote {tmp_path/'a'/'audit.json'}" in out
    j = json.loads((tmp_path/'a'/'audit.json').read_text())
    assert j['leakage']['ok'] is False
    assert {p['patient_id'] for p in j['leakage']['patients_in_several_splits']} == set(multi.patient_id)
    assert sorted(os.listdir(tmp_path/'a')) == ['audit.json', 'splits.csv']   # written whole: no temporary file left


def test_tiny_audit_says_it_can_say_nothing(shared, tmp_path):
    "Three films: the first printed line is the warning, and audit.json carries the same line."
    shared[['file']].head(3).assign(split=['train', 'train', 'valid']).to_csv(tmp_path/'tiny.csv', index=False)
    code, out, _ = _audit('--splits', tmp_path/'tiny.csv', '--no-source-check', '--out', tmp_path/'a')
    assert code == 0
    assert out.startswith('warning: only 3 image(s), in 2 split(s) (train 2, valid 1): too few for this audit to say anything')
    assert json.loads((tmp_path/'a'/'audit.json').read_text())['warning'] == out.splitlines()[0]


def test_clear_errors_and_exit_codes(shared, tmp_path):
    "A missing --splits file and a --model that is not a run folder: one line naming it, usage exit code (2)."
    from covidcxr.cli import EXIT_USAGE
    code, _, err = _audit('--splits', tmp_path/'nope.csv', '--no-source-check')
    assert code == EXIT_USAGE and f'--splits {tmp_path/"nope.csv"}: no such file' in err
    code, _, err = _audit('--model', tmp_path, '--no-source-check')
    assert code == EXIT_USAGE and 'not a covidcxr model or run folder' in err and len(err.strip().splitlines()) == 1
    pd.DataFrame({'file': ['images/nowhere.jpg'], 'split': ['train']}).to_csv(tmp_path/'gone.csv', index=False)
    code, _, err = _audit('--splits', tmp_path/'gone.csv', '--no-source-check')
    assert code != 0 and 'gone.csv' in err and 'not in the dataset' in err
