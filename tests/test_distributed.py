"""Data-parallel training: `covidcxr train` under `accelerate launch` with 2 CPU processes (gloo), on the shared films.

One quick real training (64 px, 6 epochs) in one process, the same under a 2-process `accelerate launch` with half the
batch size per process (so the global batch, the steps per epoch and the rate are the single run's), then: one run
folder, complete, nothing partial left, the same split, and the 2-process figures inside the single run's 95% CIs.
Both processes share the machine's cores; the test takes a few minutes on a busy 2-core box.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd, pytest

pytest.importorskip('accelerate')
SETTING = ['--size', '64', '--epochs', '6', '--freeze-epochs', '0', '--lr', '1e-2']
BS = 16   # the single run's batch size: each of the 2 processes takes BS // 2

def _env(tmp:Path)->dict:
    "CPU processes (gloo) even on a GPU machine, one thread each, and no user accelerate config."
    return {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HOME': str(tmp/'hf')}

def _launch(tmp:Path, *args)->list:
    "`accelerate launch` of 2 CPU processes, on a free port."
    return [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
            '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0', *args]

def _run(cmd, tmp):
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=1800)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p

@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared):
    "The same quick training in one process and in two (`accelerate launch`): their run folders and the 2-process log."
    tmp = tmp_path_factory.mktemp('dist')
    (tmp/'one').mkdir(); (tmp/'two').mkdir()
    train = ['train', '--recipe', 'covid_vs_pneumonia_146', *SETTING]
    _run([sys.executable, '-m', 'covidcxr.cli', *train, '--bs', str(BS), '--out', str(tmp/'one'/'run')], tmp)
    p = _run(_launch(tmp, '-m', 'covidcxr.cli', *train, '--bs', str(BS // 2), '--out', str(tmp/'two'/'run')), tmp)
    return tmp/'one'/'run', tmp/'two'/'run', p.stdout

def test_one_complete_run_folder(runs):
    one, two, out = runs
    assert os.listdir(two.parent) == ['run']                         # one folder, no `.run.partial-*` left behind
    m = json.loads((two/'metrics.json').read_text())
    for f in ['splits.csv', 'model/config.json', *m['files'].values()]: assert (two/f).is_file(), f
    assert m['files']['report'] == 'report.html'
    assert (m['run']['processes'], m['run']['bs'], m['run']['global_bs']) == (2, BS // 2, BS)
    assert out.count('data-parallel training: 2 processes (gloo)') == 1   # only rank 0 speaks
    assert out.count('unfrozen epoch 6/6') == 1

def test_same_split(runs):
    one, two, _ = runs
    m1, m2 = (json.loads((r/'metrics.json').read_text()) for r in (one, two))
    assert m1['split']['split_id'] == m2['split']['split_id']
    pd.testing.assert_frame_equal(pd.read_csv(one/'splits.csv'), pd.read_csv(two/'splits.csv'))
    assert json.loads((two/'model'/'config.json').read_text())['split_id'] == m1['split']['split_id']

def test_metrics_within_single_process_ci(runs):
    one, two, _ = runs
    m1, m2 = (json.loads((r/'metrics.json').read_text()) for r in (one, two))
    from covidcxr.core import fmt_ci
    bad = []
    for s in ('valid', 'test'):
        for k in ('accuracy', 'macro_auc'):
            a, b = m1[s]['metrics'][k], m2[s]['metrics'][k]
            print(f"{s} {k}: 1 process {fmt_ci(a)}; 2 processes {fmt_ci(b)}")
            if not a['ci_low'] <= b['value'] <= a['ci_high']: bad.append(f'{s} {k}')
    assert not bad, f"2-process figures outside the 1-process run's 95% CI: {bad}"

def test_split_mismatch_is_refused(tmp_path):
    "Processes that disagree on the split stop the run with an error naming each rank's split id (synthetic disagreement)."
    script = tmp_path/'differ.py'
    script.write_text(textwrap.dedent('''
        from covidcxr.run import distrib_setup, same_on_all_ranks
        rank, n = distrib_setup()
        same_on_all_ranks(f'split-{rank}', 'the split (split id)')
        print('NOT REACHED')
    '''))
    p = subprocess.run(_launch(tmp_path, str(script)), capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert p.returncode != 0
    assert 'the split (split id) differs between processes: rank 0 split-0, rank 1 split-1' in p.stderr
    assert 'NOT REACHED' not in p.stdout
