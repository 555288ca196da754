"Fixtures shared by the test modules: the shared dataset table, and a tiny trained model folder."
import pandas as pd, pytest
from covidcxr.core import data_root

@pytest.fixture(scope='module')
def shared():
    try: root = data_root()
    except Exception as e: pytest.skip(f'no dataset: {e}')
    from covidcxr.data import load_dataset
    return load_dataset(root)

@pytest.fixture(scope='module')
def tiny_learner(shared):
    "A function: an efficientnet_lite0 fitted one epoch at 64 px on `n` real patients per class (COVID, pneumonia); the plumbing, not accuracy."
    def make(n:int, pcts:tuple, seed:int):
        from covidcxr.data import patient_split, cxr_dls
        from covidcxr.learner import build_learner
        small = pd.concat([shared[shared.label == l].drop_duplicates('patient_id').head(n) for l in ('covid', 'pneumonia')])
        learn = build_learner(cxr_dls(patient_split(small, pcts=pcts, seed=seed), size=64, bs=8), 'efficientnet_lite0')
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
        return learn
    return make

@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, tiny_learner):
    "A tiny efficientnet_lite0 trained for one epoch at 64 px on 20 real X-rays (tests the plumbing, not accuracy)."
    from covidcxr.learner import save_model
    return save_model(tiny_learner(10, (0.8, 0.2, 0.), 1), tmp_path_factory.mktemp('m')/'model')
