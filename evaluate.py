"""Zero-shot evaluation with the FetalCLIP protocol (SPEC section 4), a faster HC18 path, and the
paper's analyses.

    python evaluate.py out/best.pt                          # table + out/best_zeroshot.json
    python evaluate.py FetalCLIP_weights.pt --model=fetalclip \
        --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18        # the published teacher figures
    python evaluate.py out/best.pt --split=report           # held-out patients only (see README)
    python evaluate.py out/best.pt --analysis               # + linear probe, geometry, plots
    python evaluate.py out/best.pt --bench_hc18             # cached vs per-image GA text encoding

JSON layout (nested): five_planes.{f1, recall, accuracy, top2, top3, n, per_class.<name>.{f1,
recall, n}}, brain_subplanes.{same}, hc18.{validity, valid, n, ci_low, ci_high, spearman,
n_images, text_encodings}, f1_all, avg, split.
"""
import argparse
import json
import math
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

PROMPTS = json.loads(Path(__file__).with_name('zero_shot_prompts.json').read_text())
FIVE_PLANES = list(PROMPTS['five_planes'])            # class index = key order (9 classes)
BRAIN_SUBPLANES = list(PROMPTS['brain_subplanes'])    # 3 classes
PLANE_TO_CLASS = {'Fetal brain': 'brain', 'Fetal abdomen': 'abdomen', 'Fetal thorax': 'heart',
                  'Fetal femur': 'femur', 'Maternal cervix': 'cervix'}   # 'Other' is dropped
BRAIN_DROPPED = {'Not A Brain', 'Other'}
GA_DAYS = np.array([7 * weeks + day for weeks in range(14, 39) for day in range(7)])  # 98..272
# HC (mm) quantile curves over GA (FetalCLIP release, INTERGROWTH-style fit): exp(poly3(days / 7))
GA_CURVES = {'q025': (1.59317517131532, 0.29459800552433, -7.3860372566707e-3, 6.56951770216148e-5),
             'q500': (2.09924879247164, 0.253373656106037, -6.05647816678282e-3, 5.14256072059917e-5),
             'q975': (2.50074069629423, 0.220067854715719, -4.93623111462443e-3, 3.89066000946519e-5)}
HC_MIN, HC_MAX, TOP_N, BOOTSTRAP = 100.0, 342.0, 15, 10_000

# -----------------------------------------------------------------------------
# protocol: metrics on arrays


def per_class_scores(predictions, labels):
    """{class: (f1, recall, n)} over the classes present in `labels`. A prediction of an absent
    class is only a miss for the true class: it is nobody's false positive that counts."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = {}
    for c in np.unique(labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores[c.item()] = (2 * tp / (2 * tp + fp + fn), tp / (tp + fn), int(tp + fn))  # F1 = 0 if tp = 0
    return scores


def macro_f1(predictions, labels):
    """Macro F1 over the classes present in `labels` (= sklearn f1_score(labels=present))."""
    return float(np.mean([f1 for f1, _, _ in per_class_scores(predictions, labels).values()]))


def classification_metrics(probs, labels, class_names):
    """probs (N, C) softmax over all C prompt classes, labels (N,) class indices."""
    ranked = np.argsort(-probs, axis=1, kind='stable')  # ties: lower class index first
    per_class = per_class_scores(ranked[:, 0], labels)
    out = {'f1': float(np.mean([s[0] for s in per_class.values()])) if per_class else math.nan,
           'recall': float(np.mean([s[1] for s in per_class.values()])) if per_class else math.nan,
           'accuracy': float(np.mean(ranked[:, 0] == labels)) if len(labels) else math.nan}
    for k in (2, 3):
        out[f'top{k}'] = float(np.mean((ranked[:, :k] == labels[:, None]).any(1))) if len(labels) else math.nan
    out['n'] = int(len(labels))
    out['per_class'] = {class_names[c]: {'f1': float(f1), 'recall': float(r), 'n': n}
                        for c, (f1, r, n) in per_class.items()}
    return out


def ga_quantile(days, curve='q500'):
    """HC in mm at gestational age `days` on one of the GA_CURVES."""
    b0, b1, b2, b3 = GA_CURVES[curve]
    w = np.asarray(days, dtype=np.float64) / 7
    return np.exp(b0 + b1 * w + b2 * w ** 2 + b3 * w ** 3)


def ga_prediction(scores, top_n=TOP_N):
    """(n, 175) -> (n,) predicted days: the median index among the top_n highest scores.
    The released code sorts [index, score] pairs by score descending with Python's stable sort,
    so equal scores keep index order (the lower index ranks higher, also at the top_n cut-off),
    then re-sorts the kept pairs by index and takes position top_n // 2 (= 7)."""
    top = np.argsort(-np.asarray(scores), axis=1, kind='stable')[:, :top_n]
    return GA_DAYS[np.sort(top, axis=1)[:, top_n // 2]]  # the release indexes days with 98 + index


def ga_validity(scores, true_hc):
    """scores (n, 175) template-averaged over GA days 98..272, true_hc (n,) mm -> dict. Bootstrap:
    numpy default_rng(42), 10,000 resamples of the kept images, percentiles 2.5 / 97.5."""
    scores, true_hc = np.asarray(scores), np.asarray(true_hc, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(GA_DAYS) or len(true_hc) != len(scores):
        raise ValueError(f'ga_validity: expected scores (n, {len(GA_DAYS)}) and true_hc (n,), '
                         f'got {scores.shape} and {true_hc.shape}')
    pred_days = ga_prediction(scores)
    kept = (true_hc >= HC_MIN) & (true_hc <= HC_MAX)  # inclusive bounds
    is_valid = kept & (ga_quantile(pred_days, 'q025') <= true_hc) & (true_hc <= ga_quantile(pred_days, 'q975'))
    hits, n = is_valid[kept], int(kept.sum())
    ci_low = ci_high = spearman = math.nan
    if n:
        draws = np.random.default_rng(42).integers(0, n, size=(BOOTSTRAP, n))
        ci_low, ci_high = np.percentile(100 * hits[draws].mean(1), [2.5, 97.5])
    if n > 1 and np.ptp(pred_days[kept]) > 0:
        spearman = stats.spearmanr(pred_days[kept], true_hc[kept]).statistic
    return {'validity': float(100 * hits.mean()) if n else math.nan, 'valid': int(hits.sum()), 'n': n,
            'ci_low': float(ci_low), 'ci_high': float(ci_high), 'spearman': float(spearman),
            'pred_days': pred_days, 'kept': kept, 'is_valid': is_valid}

# -----------------------------------------------------------------------------
# encoding


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(self.paths[i]).convert('RGB')
        return self.transform(image), max(image.size)  # original size, before pad-to-square


@torch.no_grad()
def encode_images(model, paths, batch_size=64, device='cpu', workers=0):
    """-> (N, D) L2-normalised float32 CPU features and the (N,) original max(W, H) of each image."""
    import data
    transform = data.eval_transform(model.image_size, model.image_mean, model.image_std)
    loader = torch.utils.data.DataLoader(_Images(list(paths), transform), batch_size=batch_size,
                                         num_workers=workers)
    features, sides = [], []
    for images, max_sides in loader:
        features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
        sides += max_sides.tolist()
    return (torch.cat(features) if features else torch.zeros(0, model.embed_dim)), sides


@torch.no_grad()
def encode_prompts(model, prompts, device='cpu'):
    import data
    tokens = data.tokenize(prompts, context_length=model.context_length).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()  # (P, D)


def class_embeddings(model, prompts_by_class, device='cpu'):
    """Encode each prompt, L2-normalise, average per class, re-normalise -> (C, D)."""
    return F.normalize(torch.stack([encode_prompts(model, p, device).mean(0)
                                    for p in prompts_by_class.values()]), dim=-1)


def ga_text_features(model, spacing, device='cpu'):
    """(5, 175, D): each GA template over weeks 14..38 x days 0..6, one template per batch as the
    release does, so cached and per-image features are bit-identical."""
    return torch.stack([encode_prompts(model, [
        template.replace('{weeks}', str(weeks)).replace('{day}', str(day)).replace('{pixel_spacing}', spacing)
        for weeks in range(14, 39) for day in range(7)], device) for template in PROMPTS['ga_templates']])


def ga_scores(model, image_features, spacings, cache_text=True, device='cpu'):
    """image_features (n, D), spacings n '%.2f' strings -> ((n, 175) float32 scores, prompts encoded).
    The GA text features depend on the image only through its spacing string, so cache_text=True
    encodes them once per distinct string; cache_text=False re-encodes them per image (release)."""
    cache, encoded, scores = {}, 0, []
    for feature, spacing in zip(image_features, spacings):
        if not cache_text or spacing not in cache:
            cache[spacing] = ga_text_features(model, spacing, device).flatten(0, 1)  # (875, D)
            encoded += cache[spacing].shape[0]
        text = cache[spacing] if cache_text else cache.pop(spacing)
        # 100 * img @ txt.T per image, averaged over the 5 templates: (1, 875) -> (175,)
        scores.append((100.0 * feature[None] @ text.T).view(len(PROMPTS['ga_templates']), -1).mean(0))
    return torch.stack(scores).numpy() if scores else np.zeros((0, len(GA_DAYS)), np.float32), encoded

# -----------------------------------------------------------------------------
# datasets and the zero-shot benchmark


def select_split(patient, split):
    """'all' = the published protocol; 'select' / 'report' = a patient-disjoint 20 / 80 split, fixed
    by a hash of the patient id, for choosing checkpoints on data the report never sees."""
    if split == 'all':
        return True
    if split not in ('select', 'report'):
        raise ValueError(f"split must be 'all', 'select' or 'report', got {split!r}")
    return (zlib.crc32(str(patient).encode()) % 5 == 0) == (split == 'select')


def _require(folder, csv_name, what):
    if not (Path(folder) / csv_name).is_file():
        raise FileNotFoundError(
            f'{what}: {Path(folder) / csv_name} not found. Generate the synthetic benchmark with '
            f'`python data.py` (writes data/demo/planes and data/demo/hc18), or point '
            f'--planes_dir / --hc18_dir at the real {what} folder.')


def planes_rows(planes_dir, split='all', include_other=False):
    """Planes DB rows with 'five' / 'brain' class indices (-1 where the protocol drops the row)."""
    import data
    _require(planes_dir, 'FETAL_PLANES_DB_data.csv', 'Planes DB')
    rows = []
    for row in data.read_planes_db(planes_dir):
        plane, brain = row['plane'], row['brain_plane']
        if plane != 'Other' and plane not in PLANE_TO_CLASS:
            raise ValueError(f'{planes_dir}: unknown Plane {plane!r}, expected one of {list(PLANE_TO_CLASS)} or Other')
        if brain not in BRAIN_DROPPED and brain.lower() not in BRAIN_SUBPLANES:
            raise ValueError(f'{planes_dir}: unknown Brain_plane {brain!r}, expected {BRAIN_SUBPLANES} or {BRAIN_DROPPED}')
        five = FIVE_PLANES.index(PLANE_TO_CLASS[plane]) if plane in PLANE_TO_CLASS else -1
        sub = BRAIN_SUBPLANES.index(brain.lower()) if brain not in BRAIN_DROPPED else -1
        if select_split(row['patient'], split) and (five >= 0 or sub >= 0 or include_other):
            rows.append(dict(row, five=five, sub=sub))
    return rows


def hc18_rows(hc18_dir, split='all'):
    import data
    _require(hc18_dir, 'training_set_pixel_size_and_HC.csv', 'HC18')
    # HC18 names images <subject>_HC.png, <subject>_2HC.png, ...: the prefix is the subject
    return [row for row in data.read_hc18(hc18_dir) if select_split(row['filename'].split('_')[0], split)]


def zero_shot(model, planes_dir, hc18_dir, batch_size=64, device='cpu', split='all', cache_text=True,
              workers=0, details=False):
    """Five planes, brain sub-planes and HC18 (SPEC 4) -> nested dict (module docstring). The model
    must already be on `device`; its train/eval mode is restored. details=True adds the features
    and per-image predictions under '_details' (not JSON-serialisable; used by the analyses)."""
    was_training = model.training
    model.eval()
    rows = planes_rows(planes_dir, split, include_other=details)
    hc_rows = hc18_rows(hc18_dir, split)
    features, _ = encode_images(model, [r['path'] for r in rows], batch_size, device, workers)
    results, extra = {'split': split}, {'planes_rows': rows, 'planes_features': features}
    for key, prompts, label in (('five_planes', PROMPTS['five_planes'], 'five'),
                                ('brain_subplanes', PROMPTS['brain_subplanes'], 'sub')):
        labels = np.array([r[label] for r in rows], dtype=np.int64)
        logits = 100.0 * features @ class_embeddings(model, prompts, device).T  # (N, C)
        mask = labels >= 0
        results[key] = classification_metrics(logits[mask].softmax(-1).numpy(), labels[mask], list(prompts))
        extra[key + '_logits'] = logits
    hc_features, sides = encode_images(model, [r['path'] for r in hc_rows], batch_size, device, workers)
    spacings = [f"{side / model.image_size * r['pixel_size']:.2f}" for side, r in zip(sides, hc_rows)]
    scores, encoded = ga_scores(model, hc_features, spacings, cache_text, device)
    hc = ga_validity(scores, [r['hc'] for r in hc_rows])
    results['hc18'] = {k: hc[k] for k in ('validity', 'valid', 'n', 'ci_low', 'ci_high', 'spearman')}
    results['hc18'].update(n_images=len(hc_rows), text_encodings=encoded)
    results['f1_all'] = (5 * results['five_planes']['f1'] + 3 * results['brain_subplanes']['f1']) / 8
    results['avg'] = (results['f1_all'] + hc['validity'] / 100) / 2
    if details:
        results['_details'] = dict(extra, hc18=hc, hc18_true=np.array([r['hc'] for r in hc_rows]),
                                   hc18_scores=scores, hc18_features=hc_features)
    model.train(was_training)
    return results


def format_table(results):
    lines = []
    for key, title in (('five_planes', 'Five planes'), ('brain_subplanes', 'Brain sub-planes')):
        r = results[key]
        lines += [f'{title} (n={r["n"]})', f'  {"class":<20} {"F1":>7} {"recall":>7} {"n":>6}']
        lines += [f'  {name:<20} {c["f1"]:7.4f} {c["recall"]:7.4f} {c["n"]:6d}' for name, c in r['per_class'].items()]
        lines += [f'  {"macro":<20} {r["f1"]:7.4f} {r["recall"]:7.4f}',
                  f'  accuracy {r["accuracy"]:.4f} | top-2 {r["top2"]:.4f} | top-3 {r["top3"]:.4f}']
    h = results['hc18']
    lines += [f'HC18 validity {h["validity"]:.2f}% ({h["valid"]}/{h["n"]}), 95% CI [{h["ci_low"]:.2f}, '
              f'{h["ci_high"]:.2f}], Spearman {h["spearman"]:.4f}',
              f'F1-all {results["f1_all"]:.4f} | Avg {results["avg"]:.4f} | split {results["split"]}']
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# analyses (--analysis): linear probe, embedding geometry, teacher-student logits, plots


def student_t_ci(values, confidence=0.95):
    """-> (mean, low, high), the Student-t interval of the mean over independent runs."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def _fit_probe(features, labels, fit, val, n_classes, seed, epochs, lr, weight_decay, batch_size):
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], n_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    snapshot = lambda: {k: v.clone() for k, v in probe.state_dict().items()}
    best_loss, best_state = math.inf, snapshot()
    for _ in range(epochs):
        for batch in torch.from_numpy(fit)[torch.randperm(len(fit))].split(batch_size):
            loss = F.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = F.cross_entropy(probe(features[val]), labels[val]).item()
        if val_loss < best_loss or not len(val):  # the epoch with the best validation loss
            best_loss, best_state = val_loss, snapshot()
    probe.load_state_dict(best_state)
    return probe


def linear_probe(features, labels, groups, is_train, folds=5, seeds=5, epochs=50, lr=3e-4,
                 weight_decay=0.01, batch_size=64):
    """Macro F1 of one linear layer on frozen L2-normalised features (FetalCLIP's probe recipe).
    Per seed the training patients (`groups`) are dealt into `folds` disjoint folds; each fold
    validates once while the others train; every run is tested on the rows with is_train False."""
    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=-1)
    labels, groups = torch.as_tensor(np.asarray(labels), dtype=torch.long), np.asarray(groups)
    train, test = np.flatnonzero(is_train), np.flatnonzero(~np.asarray(is_train, dtype=bool))
    f1s = []
    for seed in range(seeds):
        patients = np.random.default_rng(seed).permutation(np.unique(groups[train]))
        fold_of = {p: i % folds for i, p in enumerate(patients)}
        fold = np.array([fold_of[g] for g in groups[train]])
        for k in range(folds):
            probe = _fit_probe(features, labels, train[fold != k], train[fold == k], int(labels.max()) + 1,
                               seed, epochs, lr, weight_decay, batch_size)
            with torch.no_grad():
                f1s.append(macro_f1(probe(features[test]).argmax(1).numpy(), labels[test].numpy()))
    mean, low, high = student_t_ci(f1s)
    return {'f1': mean, 'ci_low': low, 'ci_high': high, 'runs': len(f1s)}


def geometry(features, labels, t=2.0, block=1024):
    """Embedding geometry of L2-normalised features: participation ratio (sum l)^2 / sum l^2 and
    Rank95 of the covariance spectrum, silhouette (sklearn, euclidean), mean cosine over ordered
    pairs i != j of the same / of different classes, uniformity log mean exp(-t |xi - xj|^2)."""
    from sklearn.metrics import silhouette_score
    x, labels = F.normalize(torch.as_tensor(features, dtype=torch.float64), dim=-1), np.asarray(labels)
    variances = torch.linalg.eigvalsh(torch.cov(x.T)).clamp(min=0).flip(0)  # descending
    rank95 = int(torch.searchsorted(variances.cumsum(0) / variances.sum(), torch.tensor(0.95, dtype=x.dtype))) + 1
    classes = np.unique(labels)
    counts = np.array([np.sum(labels == c) for c in classes])
    class_sums = [x[torch.from_numpy(labels == c)].sum(0) for c in classes]
    within = sum(float(s @ s) for s in class_sums)        # sum of cos over same-class pairs, diagonal incl.
    total = float(x.sum(0) @ x.sum(0))
    near = 0.0                                            # sum over i != j of exp(-t |xi - xj|^2)
    for start in range(0, len(x), block):
        kernel = torch.exp(-t * (2 - 2 * x[start:start + block] @ x.T).clamp(min=0))
        near += float(kernel.sum() - kernel.diagonal(offset=start).sum())
    n = len(x)
    return {'participation_ratio': float(variances.sum() ** 2 / (variances ** 2).sum()),
            'rank95': min(rank95, len(variances)),
            'silhouette': float(silhouette_score(x.numpy(), labels)) if 1 < len(classes) < n else math.nan,
            'intra_cosine': (within - n) / float(np.sum(counts * (counts - 1))),
            'inter_cosine': (total - within) / float(n * n - np.sum(counts ** 2)),
            'uniformity': math.log(near / (n * (n - 1)))}


def logit_agreement(student_logits, teacher_logits):
    """Mean softmax entropy of each model's zero-shot logits (N, C) and the mean per-image Spearman
    correlation between the student's and the teacher's class rankings."""
    entropy = lambda z: float(-(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean())
    with warnings.catch_warnings():  # a constant row has no ranking: NaN, skipped by nanmean
        warnings.simplefilter('ignore', stats.ConstantInputWarning)
        rho = [stats.spearmanr(s, t).statistic for s, t in zip(student_logits.numpy(), teacher_logits.numpy())]
    return {'entropy_student': entropy(student_logits), 'entropy_teacher': entropy(teacher_logits),
            'spearman': float(np.nanmean(rho)) if rho else math.nan}


def _figure(path, draw, size=(5, 4)):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return str(path)


def plot_tsne(features, labels, names, path):
    from sklearn.manifold import TSNE
    xy = TSNE(2, init='pca', random_state=0, perplexity=min(30, len(features) - 1),
              method='barnes_hut' if len(features) > 500 else 'exact').fit_transform(features.numpy())
    def draw(fig):
        ax = fig.gca()
        for c, name in enumerate(names):
            ax.scatter(*xy[labels == c].T, s=6, label=name)
        ax.set(title='Brain sub-planes (t-SNE)', xticks=[], yticks=[])
        ax.legend(markerscale=2)
    return _figure(path, draw)


def plot_hc18(true_hc, hc, path):
    def draw(fig):
        ax, days = fig.gca(), np.arange(GA_DAYS[0], GA_DAYS[-1] + 1)
        for curve, colour, label in (('q500', 'k', 'median'), ('q025', 'darkorange', '2.5% / 97.5%'), ('q975', 'darkorange', None)):
            ax.plot(ga_quantile(days, curve), days, '-' if curve == 'q500' else '--', color=colour, label=label)
        for mask, colour, name in ((hc['is_valid'], 'royalblue', 'valid'), (hc['kept'] & ~hc['is_valid'], 'red', 'invalid')):
            ax.scatter(true_hc[mask], hc['pred_days'][mask], s=10, color=colour, edgecolor='k', linewidth=0.3, label=name)
        ax.set(xlabel='True HC (mm)', ylabel='Predicted GA (days)', title=f'HC18 validity {hc["validity"]:.1f}%')
        ax.legend(frameon=False)
    return _figure(path, draw)


def plot_dynamics(log_path, path):
    """From train.py's log.jsonl: the KD weight ('weight') per step and the zero-shot Avg per epoch."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if 'weight' in r and 'step' in r]
    epochs = [r for r in records if 'avg' in r.get('eval', {})]
    def draw(fig):
        left, right = fig.subplots(1, 2)
        left.plot([r['step'] for r in steps], [r['weight'] for r in steps])
        left.axhline(0, color='grey', linewidth=0.5)
        left.set(xlabel='step', ylabel='KD weight (lambda or beta)', title='KD weight')
        right.plot([r['epoch'] + 1 for r in epochs], [r['eval']['avg'] for r in epochs], 'o-')
        right.set(xlabel='epoch', ylabel='Avg', title='Zero-shot Avg')
    return _figure(path, draw, size=(9, 3.5))


def analysis(details, out_dir, teacher_details=None, log_path='', probe_epochs=50, probe_seeds=5):
    """All analyses from zero_shot(..., details=True) output -> dict (plots written to out_dir)."""
    rows, features = details['planes_rows'], details['planes_features']
    views = list(PLANE_TO_CLASS) + ['Other']
    groups = np.array([str(r['patient']) for r in rows])
    is_train = np.array([bool(int(r['train'])) for r in rows])
    five, sub = np.array([r['five'] for r in rows]), np.array([r['sub'] for r in rows])
    out, brain = {}, sub >= 0
    out['probe_6view'] = linear_probe(features, [views.index(r['plane']) for r in rows], groups, is_train,
                                      epochs=probe_epochs, seeds=probe_seeds)
    out['probe_brain'] = linear_probe(features[brain], sub[brain], groups[brain], is_train[brain],
                                      epochs=probe_epochs, seeds=probe_seeds)
    out['geometry_5planes'] = geometry(features[five >= 0], five[five >= 0])
    if teacher_details is not None:
        out['logits_5planes'] = logit_agreement(details['five_planes_logits'][five >= 0],
                                                teacher_details['five_planes_logits'][five >= 0])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out['plots'] = [plot_tsne(features[brain], sub[brain], BRAIN_SUBPLANES, Path(out_dir) / 'tsne_brain.png'),
                    plot_hc18(details['hc18_true'], details['hc18'], Path(out_dir) / 'hc18_ga.png')]
    if log_path and Path(log_path).is_file():
        out['plots'].append(plot_dynamics(log_path, Path(out_dir) / 'training_dynamics.png'))
    return out

# -----------------------------------------------------------------------------
# command line


def bench_hc18(model, hc18_dir, batch_size=64, device='cpu', workers=0):
    """Wall clock and prompts encoded: GA text cached per spacing string vs re-encoded per image."""
    rows = hc18_rows(hc18_dir)
    features, sides = encode_images(model, [r['path'] for r in rows], batch_size, device, workers)
    spacings = [f"{side / model.image_size * r['pixel_size']:.2f}" for side, r in zip(sides, rows)]
    runs = {}
    for cache_text in (True, False):
        start = time.perf_counter()
        scores, encoded = ga_scores(model, features, spacings, cache_text, device)
        runs[cache_text] = (time.perf_counter() - start, encoded, scores)
    (fast, fast_n, fast_scores), (slow, slow_n, slow_scores) = runs[True], runs[False]
    print(f'HC18 GA scores, {len(rows)} images, {len(set(spacings))} distinct spacing strings:\n'
          f'  cached    {fast:8.2f} s  {fast_n:8d} prompts encoded\n'
          f'  per-image {slow:8.2f} s  {slow_n:8d} prompts encoded (released procedure)\n'
          f'  speed-up {slow / fast:.1f}x, scores identical: {np.array_equal(fast_scores, slow_scores)}')
    return {'cached_s': fast, 'uncached_s': slow, 'cached_prompts': fast_n, 'uncached_prompts': slow_n,
            'identical': bool(np.array_equal(fast_scores, slow_scores))}


def _plain(obj):
    """JSON-ready copy: numpy scalars -> Python, NaN -> null."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not str(k).startswith('_')}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic, float)):
        obj = obj.item() if isinstance(obj, np.generic) else obj
        return None if isinstance(obj, float) and math.isnan(obj) else obj
    return obj


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('ckpt', nargs='?', default='', help="checkpoint ('' with --bench_hc18: random demo_student)")
    parser.add_argument('--model', default='', help="model name; '' = from the checkpoint's config")
    parser.add_argument('--planes_dir', default='data/demo/planes')
    parser.add_argument('--hc18_dir', default='data/demo/hc18')
    parser.add_argument('--out_json', default='', help="'' = <ckpt stem>_zeroshot.json beside the checkpoint")
    parser.add_argument('--device', default='', help="'' = cuda, else mps, else cpu")
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=0, help='image-loading worker processes')
    parser.add_argument('--split', default='all', choices=['all', 'select', 'report'])
    parser.add_argument('--no_cache_text', action='store_true', help='re-encode GA prompts per image (release)')
    parser.add_argument('--analysis', action='store_true', help='linear probe, geometry and plots')
    parser.add_argument('--teacher', default='', help='teacher checkpoint for the logit analysis')
    parser.add_argument('--teacher_model', default='fetalclip')
    parser.add_argument('--log', default='', help="training log.jsonl; '' = log.jsonl beside the checkpoint")
    parser.add_argument('--probe_epochs', type=int, default=50)
    parser.add_argument('--bench_hc18', action='store_true', help='time cached vs per-image GA text')
    args = parser.parse_args(argv)
    device = args.device or ('cuda' if torch.cuda.is_available() else
                             'mps' if torch.backends.mps.is_available() else 'cpu')
    import model as model_lib
    try:
        if args.ckpt and not Path(args.ckpt).is_file():
            raise FileNotFoundError(f'checkpoint {args.ckpt} not found (train one with `python train.py`)')
        load = lambda path, name: model_lib.load_model(path, name).to(device).eval()
        if args.bench_hc18:
            net = load(args.ckpt, args.model) if args.ckpt else model_lib.create_model(args.model or 'demo_student').to(device).eval()
            return bench_hc18(net, args.hc18_dir, args.batch_size, device, args.workers)
        if not args.ckpt:
            parser.error('a checkpoint is required')
        kwargs = dict(batch_size=args.batch_size, device=device, split=args.split, workers=args.workers,
                      cache_text=not args.no_cache_text, details=args.analysis)
        results = zero_shot(load(args.ckpt, args.model), args.planes_dir, args.hc18_dir, **kwargs)
        print(format_table(results))
        ckpt = Path(args.ckpt)
        if args.analysis:
            teacher = zero_shot(load(args.teacher, args.teacher_model), args.planes_dir, args.hc18_dir,
                                **kwargs)['_details'] if args.teacher else None
            results['analysis'] = analysis(results['_details'], ckpt.parent / f'{ckpt.stem}_analysis', teacher,
                                           args.log or ckpt.parent / 'log.jsonl', args.probe_epochs)
            print(json.dumps(_plain(results['analysis']), indent=1))
    except FileNotFoundError as error:
        sys.exit(f'evaluate.py: {error}')
    out_json = Path(args.out_json or ckpt.with_name(f'{ckpt.stem}_zeroshot.json'))
    out_json.write_text(json.dumps(_plain(results), indent=1))
    print(f'wrote {out_json}')
    return results


if __name__ == '__main__':
    main()
