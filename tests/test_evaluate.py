"""covidcxr.evaluate: metrics agree with scikit-learn, the patient (cluster) bootstrap behaves as it should,
thresholds and folds are reproducible, the within-source AUC is the AUC of each source's rows alone. Pure numpy
(seconds), except the last test, which trains a tiny three-class model on real films (64 px, one epoch)."""
import numpy as np, pandas as pd, pytest
from sklearn.metrics import (accuracy_score, recall_score, precision_score, f1_score, roc_auc_score,
                             confusion_matrix)
from covidcxr.evaluate import (metric_arrays, patient_weights, bootstrap_ci, evaluate, choose_threshold,
                               threshold_metrics, patient_kfold, operating_point, macro_auc, class_aucs,
                               weighted_mean, patient_cis, within_source_auc)
from covidcxr.core import fmt_ci


def _preds(n, C, seed, signal=1.0):
    r = np.random.default_rng(seed)
    t = r.integers(0, C, n)
    logits = r.normal(0, 1, (n, C)); logits[np.arange(n), t] += signal
    logits = np.round(logits, 1)   # ties in the scores, as real models produce after rounding
    p = np.exp(logits); return p / p.sum(1, keepdims=True), t


@pytest.mark.parametrize('C,seed', [(2, 0), (2, 1), (3, 2), (3, 3)])
def test_point_metrics_match_sklearn(C, seed):
    p, t = _preds(60, C, seed)
    vocab = [f'c{i}' for i in range(C)]
    m = {k: v[0] for k, v in metric_arrays(p, t, vocab, np.ones(len(t))).items()}
    pred = p.argmax(1)
    assert m['accuracy'] == pytest.approx(accuracy_score(t, pred))
    for c, n in enumerate(vocab):
        yb, pb = (t == c).astype(int), (pred == c).astype(int)
        assert m[f'{n}/sensitivity'] == pytest.approx(recall_score(yb, pb))
        assert m[f'{n}/specificity'] == pytest.approx(recall_score(1 - yb, 1 - pb))
        assert m[f'{n}/ppv'] == pytest.approx(precision_score(yb, pb, zero_division=np.nan))
        assert m[f'{n}/npv'] == pytest.approx(precision_score(1 - yb, 1 - pb))
        assert m[f'{n}/f1'] == pytest.approx(f1_score(yb, pb))
        score = p[:, c] if C > 2 else (p[:, 1] if c == 1 else -p[:, 1])   # sklearn's binary AUC scores p1
        assert m[f'{n}/auc'] == pytest.approx(roc_auc_score(yb, score))
        assert m[f'{n}/prevalence'] == pytest.approx(yb.mean())
    macro = roc_auc_score(t, p[:, 1]) if C == 2 else roc_auc_score(t, p, multi_class='ovr', average='macro')
    assert m['macro_auc'] == pytest.approx(macro)


def test_confusion_matches_sklearn():
    p, t = _preds(50, 3, 7)
    r = evaluate(p, t, list('abc'), np.arange(50), n_boot=50)
    assert (r.confusion().values == confusion_matrix(t, p.argmax(1))).all()
    assert np.allclose(r.confusion(normalize=True).values.sum(1), 1)
    c = r.counts()
    assert (c[['TP', 'FP', 'TN', 'FN']].sum(axis=1) == 50).all()


def test_weighted_metrics_equal_explicit_resample():
    p, t = _preds(40, 3, 4)
    w = np.random.default_rng(0).integers(0, 4, 40)
    idx = np.repeat(np.arange(40), w)
    m = {k: v[0] for k, v in metric_arrays(p, t, list('abc'), w[None]).items()}
    assert m['accuracy'] == pytest.approx(accuracy_score(t[idx], p[idx].argmax(1)))
    for c in range(3): assert m[f'{"abc"[c]}/auc'] == pytest.approx(roc_auc_score(t[idx] == c, p[idx, c]))


def test_one_patient_many_images_counts_once():
    pids = np.array(['big'] * 10 + [f'p{i}' for i in range(9)])
    W = patient_weights(pids, 5000, seed=0)
    assert (W[:, :10] == W[:, [0]]).all()                       # the patient's images move together
    assert W[:, 0].mean() == pytest.approx(1.0, abs=0.06)       # drawn once per resample on average, like anyone
    assert W[:, 10:].mean() == pytest.approx(1.0, abs=0.06)
    # resampling images instead would draw each of big's images ~1x independently: its total would vary less
    assert W[:, :10].sum(1).std() > 2 * np.sqrt(10 * 0.9)


def test_matches_manual_cluster_bootstrap():
    r = np.random.default_rng(1)
    pids = np.array([f'pt{i}' for i in range(30) for _ in range(1 + i % 4)])
    t = np.array([i % 2 for i in range(30) for _ in range(1 + i % 4)])
    s = np.clip(0.3 * t + r.uniform(0, 0.7, len(t)), 0, 1); p = np.stack([1 - s, s], 1)
    fast, _ = bootstrap_ci(lambda W: metric_arrays(p, t, ['n', 'y'], W), pids, n_boot=200, seed=5)
    codes, uniq = pd.factorize(pids)
    draws = np.random.default_rng(5).integers(0, len(uniq), size=(200, len(uniq)))
    auc, acc = [], []
    for d in draws:
        idx = np.concatenate([np.flatnonzero(codes == j) for j in d])
        auc.append(roc_auc_score(t[idx], p[idx, 1])); acc.append(accuracy_score(t[idx], p[idx].argmax(1)))
    assert fast['y/auc']['ci_low'] == pytest.approx(np.quantile(auc, .025))
    assert fast['y/auc']['ci_high'] == pytest.approx(np.quantile(auc, .975))
    assert fast['accuracy']['ci_low'] == pytest.approx(np.quantile(acc, .025))


def test_interval_shrinks_with_sample_size():
    widths = {}
    for n in (30, 120, 480):
        w = []
        for rep in range(4):
            p, t = _preds(n, 2, 100 + rep, signal=1.0)
            ci, _ = bootstrap_ci(lambda W: metric_arrays(p, t, ['a', 'b'], W), np.arange(n), n_boot=800, seed=rep)
            w.append([ci[k]['ci_high'] - ci[k]['ci_low'] for k in ('accuracy', 'b/auc', 'b/sensitivity')])
        widths[n] = np.mean(w, 0)
    assert (widths[30] > widths[120]).all() and (widths[120] > widths[480]).all()
    assert (widths[30] / widths[480] > 2.5).all()


def test_ci_contains_value_and_is_seeded():
    p, t = _preds(80, 3, 9)
    pids = np.repeat(np.arange(40), 2)
    a = evaluate(p, t, list('abc'), pids, n_boot=500, seed=1)
    b = evaluate(p, t, list('abc'), pids, n_boot=500, seed=1)
    assert a.metrics == b.metrics
    for v in a.metrics.values(): assert v['ci_low'] <= v['value'] <= v['ci_high']
    d = a.to_dict()
    assert (d['split'], d['n_images'], d['n_patients']) == ('test', 80, 40)
    assert all(set(v) == {'value', 'ci_low', 'ci_high'} for v in d['metrics'].values())


def test_degenerate_resamples_are_skipped_and_counted():
    p = np.array([[.8, .2], [.7, .3], [.4, .6], [.9, .1], [.3, .7], [.6, .4]]); t = np.array([0, 0, 1, 0, 0, 0])
    r = evaluate(p, t, ['neg', 'pos'], [f'z{i}' for i in range(6)], n_boot=600, seed=0)
    assert r.skipped['accuracy'] == 0
    assert 0.25 < r.skipped['pos/auc'] / 600 < 0.42      # (5/6)^6 = 33% of resamples have no positive
    assert np.isfinite(r['pos/auc']['ci_low'])


def test_class_absent_from_whole_split():
    p = np.array([[.8, .2], [.7, .3], [.6, .4]]); t = np.array([0, 0, 0])
    r = evaluate(p, t, ['neg', 'pos'], ['a', 'b', 'c'], n_boot=100)
    d = r.to_dict()
    assert 'pos/auc' in d['undefined'] and 'pos/auc' not in d['metrics']
    assert d['metrics']['accuracy']['value'] == 1.0


def test_threshold_chosen_on_valid_reported_on_test():
    pv = np.array([.9, .8, .6, .3, .5, .2, .1, .05]); tv = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    Pv = np.stack([1 - pv, pv], 1)
    assert choose_threshold(Pv, tv, ['normal', 'covid'], 'covid', 0.75) == 0.6
    assert choose_threshold(Pv, tv, ['normal', 'covid'], 'covid', 0.95) == 0.3
    valid = evaluate(Pv, tv, ['normal', 'covid'], np.arange(8), split='valid', n_boot=50)
    pt = np.array([.95, .35, .25, .7, .4, .1]); tt = np.array([1, 1, 1, 0, 0, 0])
    test = evaluate(np.stack([1 - pt, pt], 1), tt, ['normal', 'covid'], np.arange(6), split='test', n_boot=300)
    op = operating_point(valid, test, 'covid', 0.95)
    assert op['threshold'] == 0.3 and op['chosen_on'] == 'valid' and op['reported_on'] == 'test'
    assert op['metrics']['sensitivity']['value'] == pytest.approx(2 / 3)
    assert op['metrics']['specificity']['value'] == pytest.approx(1 / 3)
    for v in op['metrics'].values(): assert v['ci_low'] <= v['value'] <= v['ci_high']


def test_bad_inputs_are_named():
    p = np.array([[.5, .5], [.2, .8]])
    with pytest.raises(ValueError, match='probs must be'): evaluate(p, [0, 1], list('abc'), [1, 2])
    with pytest.raises(ValueError, match='summing to 1'): evaluate(p * 3, [0, 1], list('ab'), [1, 2])
    with pytest.raises(ValueError, match='patient_ids must have one id per image'): evaluate(p, [0, 1], list('ab'), [1])
    with pytest.raises(ValueError, match='not one of the classes'): choose_threshold(p, [0, 1], ['a', 'b'], 'covid')


def test_kfold_grouped_stratified_and_seeded():
    r = np.random.default_rng(0)
    df = pd.DataFrame({'patient_id': [f'p{i}' for i in range(60) for _ in range(1 + i % 3)]})
    df['label'] = df.patient_id.map(lambda s: ['covid', 'pneumonia'][int(s[1:]) % 2])
    a, b, c = patient_kfold(df, 5, 42), patient_kfold(df, 5, 42), patient_kfold(df, 5, 7)
    assert (a.fold == b.fold).all()
    assert not (a.fold == c.fold).all()
    assert a.groupby('patient_id').fold.nunique().max() == 1
    per_fold = a.groupby('fold').apply(lambda g: g.drop_duplicates('patient_id').label.value_counts())
    assert per_fold.min() >= 5   # 30 patients per label over 5 folds, 6 each give or take one
    with pytest.raises(ValueError, match='at least 5 patients per label'): patient_kfold(df.head(6), 5)


@pytest.mark.parametrize('C,seed', [(2, 11), (3, 12), (4, 13)])
def test_macro_auc_is_sklearns_weighted_auc(C, seed):
    "the kit's one AUC (used by metric_arrays and the audit) equals scikit-learn's, with and without weights"
    p, t = _preds(70, C, seed)
    w = np.random.default_rng(seed + 100).integers(0, 3, 70)   # not the stream `_preds` drew the targets from
    ref = (lambda **kw: roc_auc_score(t, p[:, 1], **kw)) if C == 2 else \
          (lambda **kw: roc_auc_score(t, p, multi_class='ovr', average='macro', labels=np.arange(C), **kw))
    assert macro_auc(p, t, np.ones(70))[0] == pytest.approx(ref())
    assert np.isfinite(ref(sample_weight=w)) and macro_auc(p, t, w[None])[0] == pytest.approx(ref(sample_weight=w))
    assert len(class_aucs(p, t, np.ones((3, 70)))) == C
    assert macro_auc(p, t, np.ones(70))[0] == pytest.approx(metric_arrays(p, t, [str(i) for i in range(C)], np.ones(70))['macro_auc'][0])


def test_patient_cis_is_bootstrap_ci_with_json_nones():
    p, t = _preds(60, 2, 21)
    pids = np.repeat(np.arange(30), 2)
    ref, _ = bootstrap_ci(lambda W: metric_arrays(p, t, ['a', 'b'], W), pids, n_boot=400, seed=3)
    got = patient_cis({'acc': weighted_mean(p.argmax(1) == t), 'auc': lambda W: macro_auc(p, t, W)}, pids, n_boot=400, seed=3)
    assert got['acc'] == pytest.approx(ref['accuracy']) and got['auc'] == pytest.approx(ref['macro_auc'])
    one_class = patient_cis({'auc': lambda W: macro_auc(p, np.zeros(60, int), W)}, pids, n_boot=50)
    assert one_class['auc'] == dict(value=None, ci_low=None, ci_high=None)


def test_tables_use_the_one_formatter():
    p, t = _preds(40, 2, 31)
    r = evaluate(p, t, ['a', 'b'], np.arange(40), n_boot=200)
    row = r.table().set_index('metric').loc['accuracy']
    assert row.ci == fmt_ci(r['accuracy'], label='')
    assert row.ci == f"{row.value:.3f} ({row.ci_low:.3f}-{row.ci_high:.3f})"
    assert fmt_ci(r['accuracy'], label='') in r.summary_line() and '95% CI' in r.summary_line()


@pytest.mark.parametrize('C,seed', [(2, 41), (3, 42)])
def test_within_source_auc_is_each_sources_own_auc(C, seed):
    "each source's figure is sklearn's AUC on that source's rows alone, its interval the bootstrap of that source's patients alone"
    p, t = _preds(90, C, seed)
    src = np.array(['a'] * 50 + ['b'] * 30 + ['c'] * 10)
    t[80:] = 1                                   # source c: no positive (class 0) image
    pids = np.array([f'{s}{i // 2}' for i, s in enumerate(src)])   # two images per patient
    vocab = ['covid', 'normal', 'pneumonia'][:C]
    ws = within_source_auc(p, t, vocab, pids, src, n_boot=300, seed=5)
    assert ws['positive_class'] == 'covid' and list(ws['sources']) == ['a', 'b', 'c']
    for s in ('a', 'b'):
        m = src == s; e = ws['sources'][s]
        first = 'covid vs rest' if C > 2 else 'covid vs normal'
        assert e['undefined'] is None and next(iter(e['auc'])) == first
        ref = roc_auc_score(t[m] == 0, p[m, 0]) if C > 2 else roc_auc_score(t[m] == 1, p[m, 1])   # two classes: the binary AUC of p1
        assert e['auc'][first]['value'] == pytest.approx(ref)
        ref, _ = bootstrap_ci(lambda W: {'x': class_aucs(p[m], t[m], W)[0]}, pids[m], n_boot=300, seed=5)
        assert e['auc'][first] == pytest.approx(ref['x'])
        for k in range(1, C) if C > 2 else []:
            mk = m & np.isin(t, [0, k])
            assert e['auc'][f'covid vs {vocab[k]}']['value'] == pytest.approx(roc_auc_score(t[mk] == 0, p[mk, 0]))
        assert e['n_images'] == m.sum() and e['n_patients'] == len(set(pids[m]))
        assert sum(v['images'] for v in e['by_class'].values()) == m.sum()
    c = ws['sources']['c']
    assert c['auc'] == {} and c['undefined'].startswith('undefined: no covid images from this source (only normal 10')


def test_within_source_auc_bad_input():
    p, t = _preds(20, 2, 51)
    with pytest.raises(ValueError, match='one value per image'): within_source_auc(p, t, ['covid', 'normal'], np.arange(20), ['a'] * 19)
    with pytest.raises(ValueError, match="'x' is not one of the classes"): within_source_auc(p, t, ['covid', 'normal'], np.arange(20), ['a'] * 20, pos='x')
    ws = within_source_auc(p, t, ['covid', 'normal'], np.arange(20), [None] * 5 + [''] * 5 + ['a'] * 10, n_boot=20)
    assert ws['sources']['not recorded']['n_images'] == 10 and ws['sources']['not recorded']['undefined'].startswith('undefined: the source')


@pytest.fixture(scope='module')
def three_class_model():
    "A tiny three-class model trained on real films of both sources (64 px, one epoch): it has to predict, not to be good."
    from covidcxr.core import seed_everything
    from covidcxr.data import load_dataset, patient_split, cxr_dls
    from covidcxr.learner import build_learner
    df = load_dataset()
    seed_everything(0)
    tr = pd.concat([df[(df.label == l) & (df.source == s)].drop_duplicates('patient_id').head(n)
                    for l, s, n in (('covid', 'ieee8023', 12), ('pneumonia', 'ieee8023', 4), ('pneumonia', 'nih-chestxray8', 8),
                                    ('normal', 'ieee8023', 4), ('normal', 'nih-chestxray8', 8))])
    learn = build_learner(cxr_dls(patient_split(tr, pcts=(0.8, 0.2, 0.), seed=1), size=64, bs=8), 'efficientnet_lite0')
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    return learn, df[~df.patient_id.isin(set(tr.patient_id))]


@pytest.mark.skipif(not __import__('os').environ.get('COVIDCXR_DATA'), reason='needs COVIDCXR_DATA (the shared X-rays)')
def test_within_source_auc_of_a_three_class_model_on_real_films(three_class_model):
    "ieee8023 films the model never saw, all three classes: covid vs rest, vs normal and vs pneumonia inside ieee8023; NIH undefined"
    from covidcxr.evaluate import evaluate_learner
    learn, unseen = three_class_model
    ieee = unseen[unseen.source == 'ieee8023']
    rows = pd.concat([ieee[ieee.label == 'covid'].head(15), ieee[ieee.label != 'covid'],
                      unseen[unseen.source == 'nih-chestxray8'].groupby('label').head(5)]).assign(split='heldout')
    res = evaluate_learner(learn, rows, 'heldout', n_boot=300)
    ws = res.to_dict()['within_source']
    assert ws['split'] == 'heldout' and list(learn.dls.vocab) == ['covid', 'normal', 'pneumonia']
    e, m = ws['sources']['ieee8023'], (res.items.source == 'ieee8023').values
    assert list(e['auc']) == ['covid vs rest', 'covid vs normal', 'covid vs pneumonia']
    assert e['auc']['covid vs rest']['value'] == pytest.approx(roc_auc_score(res.targets[m] == 0, res.probs[m, 0]))
    for k, name in ((1, 'normal'), (2, 'pneumonia')):
        mk = m & np.isin(res.targets, [0, k])
        assert e['auc'][f'covid vs {name}']['value'] == pytest.approx(roc_auc_score(res.targets[mk] == 0, res.probs[mk, 0]))
    for v in e['auc'].values(): assert v['ci_low'] <= v['value'] <= v['ci_high']
    assert {c: v['images'] for c, v in e['by_class'].items()} == rows[rows.source == 'ieee8023'].label.value_counts().sort_index().to_dict()
    assert ws['sources']['nih-chestxray8']['undefined'] == 'undefined: no covid images from this source (only normal 5, pneumonia 5)'
