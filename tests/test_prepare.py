"covidcxr.prepare on real shared X-rays: read-only inputs, suffix-less DICOM exports, CSV paths, loading the result."
import os, shutil, stat
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from covidcxr.core import data_root
from covidcxr.dicom import array_to_dicom, make_bad_inputs
from covidcxr.prepare import prepare_from_folders, prepare_from_csv, file_sha256, PrepareError, META_COLS

@pytest.fixture(scope='module')
def shared():
    try: root = data_root()
    except Exception as e: pytest.skip(f'no dataset: {e}')
    return root, pd.read_csv(root/'metadata.csv', dtype=str, keep_default_na=False)

def _tree(tmp_path, shared):
    root, meta = shared
    tree = tmp_path/'tree'
    for lbl in ('covid', 'pneumonia'):
        for f in meta[meta.label == lbl].file.head(3):
            (tree/lbl).mkdir(parents=True, exist_ok=True); shutil.copyfile(root/f, tree/lbl/Path(f).name)
    img = np.asarray(Image.open(root/meta.file.iloc[0]).convert('L'))
    p = array_to_dicom(img, tree/'covid'/'export'/'IM0001.dcm', photometric='MONOCHROME1', bits=12, PatientID='PACS-77')
    p.rename(p.with_suffix(''))  # hospital exports often have no suffix
    return tree

def test_read_only_inputs(tmp_path, shared):
    tree = _tree(tmp_path, shared)
    make_bad_inputs(tree/'pneumonia'/'bad')
    files = sorted(p for p in tree.rglob('*') if p.is_file())
    before = {p: file_sha256(p) for p in files}
    # read-only for a normal user (root ignores the modes; the hash comparison below is the real check)
    for p in sorted(tree.rglob('*'), reverse=True): p.chmod(0o444 if p.is_file() else 0o555)
    tree.chmod(0o555)
    try:
        res = prepare_from_folders(tree, tmp_path/'ds', progress=False)
    finally:
        for p in [tree, *tree.rglob('*')]: p.chmod(0o755 if p.is_dir() else 0o644)
    assert {p: file_sha256(p) for p in files} == before
    assert res.n_prepared + res.n_skipped == len(files)
    assert list(res.table.columns[:len(META_COLS)]) == META_COLS
    t = res.table.set_index('orig_file')
    assert t.loc['covid/export/IM0001', 'patient_id'] == 'PACS-77'  # from the header of a suffix-less DICOM

def test_prepared_dataset_loads_and_reads(tmp_path, shared):
    from covidcxr.data import load_dataset
    tree = _tree(tmp_path, shared)
    res = prepare_from_folders(tree, tmp_path/'ds', progress=False)
    df = load_dataset(tmp_path/'ds')
    assert len(df) == res.n_prepared == 7 and set(df.label) == {'covid', 'pneumonia'}
    for p in df.path:
        im = Image.open(p); assert im.mode == 'L' and max(im.size) <= 512

def test_size_option_and_overwrite(tmp_path, shared):
    tree = _tree(tmp_path, shared)
    prepare_from_folders(tree, tmp_path/'ds', size=128, progress=False)
    assert max(max(Image.open(p).size) for p in (tmp_path/'ds'/'images').rglob('*.jpg')) == 128
    with pytest.raises(PrepareError, match='already holds'): prepare_from_folders(tree, tmp_path/'ds')
    prepare_from_folders(tree, tmp_path/'ds', overwrite=True, progress=False)

def test_csv_with_absolute_paths_and_patient_column(tmp_path, shared):
    tree = _tree(tmp_path, shared)
    files = sorted(p for p in tree.rglob('*.jpg'))
    pd.DataFrame(dict(file=[str(p) for p in files], label=[p.parent.name for p in files],
                      patient_id=[f'P{i//2}' for i in range(len(files))], view='PA')).to_csv(tmp_path/'x.csv', index=False)
    res = prepare_from_csv(tmp_path/'x.csv', tmp_path/'ds', progress=False)
    assert res.n_skipped == 0 and sorted(res.table.patient_id) == sorted(f'P{i//2}' for i in range(len(files)))
    assert set(res.table.view) == {'PA'}
    with pytest.raises(PrepareError, match="no column 'label'"):
        pd.DataFrame(dict(file=['a.png'])).to_csv(tmp_path/'y.csv', index=False); prepare_from_csv(tmp_path/'y.csv', tmp_path/'ds3')
