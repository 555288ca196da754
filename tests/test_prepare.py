"covidcxr.prepare on real shared X-rays: read-only inputs, suffix-less DICOM exports, CSV paths, loading the result."
import os, shutil, stat
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from covidcxr.core import data_root
from covidcxr.test_utils import array_to_dicom, make_bad_inputs
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

# --- the edges of a real folder (issue 10, item 5): names, links, non-files, unreadable folders, failures ---
import json, tempfile
from covidcxr.cli import main

def _films(shared, n=3):
    root, meta = shared
    return [root/f for f in meta[meta.label == 'covid'].file.head(n)]

def test_odd_names_links_and_non_files_reported_by_the_cli(tmp_path, shared, capsys):
    f = _films(shared)
    tree = tmp_path/'tree'; (tree/'covid').mkdir(parents=True); (tree/'normal').mkdir()
    shutil.copyfile(f[0], tree/'covid'/'plain.jpg')
    shutil.copyfile(f[1], os.fsdecode(bytes(tree/'covid') + b'/\xff\xfe scan.jpg'))         # not UTF-8
    shutil.copyfile(f[2], os.fsdecode(bytes(tree/'normal') + b'/r\xe9sum\xe9 1.jpg'))      # Latin-1 bytes
    os.mkdir(os.fsdecode(bytes(tree) + b'/caf\xe9'))                                        # a class folder not in UTF-8
    shutil.copyfile(f[0], os.fsdecode(bytes(tree) + b'/caf\xe9/a.jpg'))
    (tree/'covid'/'loop').symlink_to('loop'); (tree/'normal'/'up').symlink_to('..')
    (tree/'covid'/'gone.png').symlink_to(tmp_path/'nowhere.png')
    (tree/'normal'/'x.png').mkdir(); os.mkfifo(tree/'normal'/'fifo.dcm')
    before = {p: file_sha256(p) for p in map(Path, [os.path.join(d, n) for d, _, ns in os.walk(tree) for n in ns]) if p.is_file() and not p.is_symlink()}
    assert main(['prepare', '--from-folders', str(tree), '--out', str(tmp_path/'ds')]) == 0
    out = capsys.readouterr().out
    out.encode('utf-8')  # printable: no surrogates reach the terminal
    meta = pd.read_csv(tmp_path/'ds'/'metadata.csv', encoding='utf-8')
    assert sorted(meta.orig_file) == ['caf\\xe9/a.jpg', 'covid/\\xff\\xfe scan.jpg', 'covid/plain.jpg', 'normal/r\\xe9sum\\xe9 1.jpg']
    assert set(meta.label) == {'covid', 'normal', 'caf\\xe9'}
    sk = pd.read_csv(tmp_path/'ds'/'skipped.csv', encoding='utf-8').set_index('file').reason
    assert sorted(sk.index) == ['covid/gone.png', 'covid/loop', 'normal/fifo.dcm', 'normal/up', 'normal/x.png']
    for name, why in [('covid/gone.png', 'dangling symlink'), ('covid/loop', 'symlink loop'), ('normal/up', 'already being read'),
                      ('normal/fifo.dcm', 'FIFO'), ('normal/x.png', 'folder named like an image')]:
        assert why in sk[name] and f'{name}: ' in out, (name, sk[name])
    assert 'escaped names: 3 name(s)' in out  # the three files (one of them in the folder caf\xe9)
    assert {p: file_sha256(p) for p in before} == before
    assert not [p for p in (tmp_path/'ds').iterdir() if p.name.startswith('.')]  # no temporary table left

def test_a_failed_preparation_leaves_no_table_and_a_rerun_works(tmp_path, shared):
    f = _films(shared, 2)
    tree = tmp_path/'tree'; (tree/'covid').mkdir(parents=True); (tree/'normal').mkdir()
    shutil.copyfile(f[0], tree/'covid'/'a.jpg'); shutil.copyfile(f[1], tree/'normal'/'b.jpg')
    (tmp_path/'ds'/'images').mkdir(parents=True); (tmp_path/'ds'/'images'/'normal').write_text('a file where a folder must go')
    with pytest.raises(OSError): prepare_from_folders(tree, tmp_path/'ds', progress=False)   # fails half-way, after 'covid'
    assert sorted(p.name for p in (tmp_path/'ds').iterdir()) == ['images']                  # no metadata.csv, no skipped.csv
    (tmp_path/'ds'/'images'/'normal').unlink()
    res = prepare_from_folders(tree, tmp_path/'ds', progress=False)                          # not refused as 'already prepared'
    assert res.n_prepared == 2 and len(pd.read_csv(tmp_path/'ds'/'metadata.csv')) == 2

def _as_unprivileged(fn):
    "Run `fn()` in a forked child that has dropped root (permissions do not stop root); returns what it returned (JSON)."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so the interpreter under root's home is not needed
        code = 1
        try:
            os.close(r); os.setgroups([]); os.setgid(65534); os.setuid(65534)
            out = json.dumps(fn()); code = 0
        except BaseException as e: out = json.dumps({'error': f'{type(e).__name__}: {e}'})
        finally:
            os.write(w, out.encode()); os._exit(code)
    os.close(w)
    with os.fdopen(r) as f: data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)

@pytest.mark.skipif(not hasattr(os, 'fork'), reason='POSIX permissions')
def test_unreadable_folder_is_reported(shared):
    "A folder the user cannot read is listed in skipped.csv (run as an unprivileged user when the tests run as root)."
    base = Path(tempfile.mkdtemp(prefix='covidcxr-perm-'))
    tree = base/'tree'
    try:
        base.chmod(0o777)
        f = _films(shared, 2)
        (tree/'covid').mkdir(parents=True); (tree/'normal'/'locked').mkdir(parents=True)
        shutil.copyfile(f[0], tree/'covid'/'a.jpg'); shutil.copyfile(f[1], tree/'normal'/'locked'/'b.jpg')
        for p in [tree, *tree.rglob('*')]: p.chmod(0o755 if p.is_dir() else 0o644)
        (tree/'normal'/'locked').chmod(0o000)
        def run():
            res = prepare_from_folders(tree, base/'ds', progress=False)
            return [res.n_prepared, res.skipped.values.tolist()]
        got = _as_unprivileged(run) if os.geteuid() == 0 else run()
        assert got == [1, [['normal/locked', 'folder cannot be read (Permission denied): its files are not included']]], got
    finally:
        if (tree/'normal'/'locked').exists(): (tree/'normal'/'locked').chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
