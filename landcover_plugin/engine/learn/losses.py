"""What training optimises and reports, per task: losses, class weights, metrics,
and the check that the training chips hold the classes the model is to learn."""
from __future__ import annotations

import numpy as np

from ...contract.names import IGNORE
from ..errors import EngineError


def check_labels(task: str, class_names: list[str], y: np.ndarray, centres_only: bool = False) -> None:
    """Refuse training that cannot learn anything: one class, or no crown (no tree centre) at all."""
    if task != "trees":
        labels = y if task == "classification" else y[..., 0]
        present = np.unique(labels[labels != IGNORE]).astype(int)
        if len(class_names) < 2 or len(present) < 2:
            names = [class_names[i] for i in present if i < len(class_names)]
            what = "chips" if task == "classification" else "chips' pixels"
            raise EngineError("ONE_CLASS", f"The training {what} hold only one class ({', '.join(names) or 'none'}): "
                              f"a {task} model needs at least two to tell apart.",
                              "Label more classes (or a larger area; for buildings, one with buildings and "
                              "open ground) and rebuild the dataset.")
    elif centres_only:
        if not np.any(y[..., 1] > 0):
            raise EngineError("ONE_CLASS", "The training chips hold no tree position.",
                              "Mark tree positions inside the imagery and rebuild the dataset.")
    elif not np.any((y[..., 0] == 1) | (y[..., 0] == 2)):
        raise EngineError("ONE_CLASS", "The training chips hold no tree crown: only background.",
                          "Annotate crowns inside the imagery and rebuild the dataset.")


def missing_classes(y: np.ndarray, class_names: list[str]) -> list[str]:
    """Land cover: the classes without a single training pixel (the model cannot predict them)."""
    present = set(np.unique(y[..., 0][y[..., 0] != IGNORE]).astype(int).tolist())
    return [name for i, name in enumerate(class_names) if i not in present]


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1, clipped to 0.1..10) so small classes count."""
    counts = np.bincount(y[y != IGNORE].astype(np.int64), minlength=n_classes)[:n_classes].astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 1.0)
    return np.clip(weights, 0.1, 10.0).astype(np.float32)


def make_loss(task: str, weights: np.ndarray | None = None, dead: bool = False, centres_only: bool = False,
              border_weight: float = 0.0):
    """The training loss; pixels marked IGNORE in the mask count for nothing.
    Land cover: class-weighted cross-entropy; buildings: the same + Dice on the
    building class (small objects); classification: class-weighted cross-entropy
    per chip. Trees: BCE + Dice on crowns, weighted MSE on the centre heatmap, and
    (with a "dead" class) BCE of the dead channel on crown pixels. `centres_only` (a
    dataset of tree positions: crowns all IGNORE): the heatmap counts on every pixel.
    `border_weight` (trees): the crown BCE of pixels on a crown's border (within a pixel of
    its edge) weighs 1 + this, so that touching crowns are kept apart."""
    import keras
    import tensorflow as tf

    if task == "classification":
        w = tf.constant(weights)

        def chip_loss(y_true, y_pred):
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
            chip_w = tf.gather(w, labels)
            ce = keras.losses.sparse_categorical_crossentropy(labels, y_pred)
            return tf.reduce_sum(ce * chip_w) / tf.maximum(tf.reduce_sum(chip_w), 1e-6)

        return chip_loss
    if task in ("landcover", "buildings"):
        w = tf.constant(weights)

        def landcover_loss(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int32)
            valid = tf.cast(labels != IGNORE, tf.float32)
            safe = tf.where(labels != IGNORE, labels, 0)
            ce = keras.losses.sparse_categorical_crossentropy(safe, y_pred)
            pixel_w = tf.gather(w, safe) * valid
            loss = tf.reduce_sum(ce * pixel_w) / tf.maximum(tf.reduce_sum(pixel_w), 1.0)
            if task == "buildings":  # Dice on channel 1 (building): small buildings count as much as large
                p, target = y_pred[..., 1] * valid, tf.cast(labels == 1, tf.float32) * valid
                loss += 1.0 - (2.0 * tf.reduce_sum(p * target) + 1.0) / (
                    tf.reduce_sum(p) + tf.reduce_sum(target) + 1.0)
            return loss

        return landcover_loss

    def trees_loss(y_true, y_pred):
        crown, heat = y_true[..., 0], y_true[..., 1] / 255.0
        valid = tf.cast(crown != IGNORE, tf.float32)
        target = tf.cast((crown == 1) | (crown == 2), tf.float32)  # live or dead crown
        p = y_pred[..., 0]
        pixel_w = valid
        if border_weight:
            t = target[..., None]
            edge = tf.nn.max_pool2d(t, 3, 1, "SAME") + tf.nn.max_pool2d(-t, 3, 1, "SAME")  # 1 next to an edge
            pixel_w = valid * (1.0 + border_weight * edge[..., 0])
        n = tf.maximum(tf.reduce_sum(pixel_w), 1.0)
        bce = tf.reduce_sum(keras.losses.binary_crossentropy(target[..., None], p[..., None]) * pixel_w) / n
        dice = 1.0 - (2.0 * tf.reduce_sum(p * target * valid) + 1.0) / (
            tf.reduce_sum(p * valid) + tf.reduce_sum(target * valid) + 1.0)
        heat_valid = tf.ones_like(valid) if centres_only else valid
        heat_w = heat_valid * (1.0 + 9.0 * heat)  # the peaks matter more than the flat background
        mse = tf.reduce_sum(heat_w * (y_pred[..., 1] - heat) ** 2) / tf.maximum(tf.reduce_sum(heat_w), 1.0)
        loss = bce + dice + 10.0 * mse
        if dead:  # channel 2: is this crown pixel dead? Judged on crown pixels only.
            on_crown = valid * target
            dead_ce = keras.losses.binary_crossentropy(tf.cast(crown == 2, tf.float32)[..., None],
                                                       y_pred[..., 2:3])
            loss += tf.reduce_sum(dead_ce * on_crown) / tf.maximum(tf.reduce_sum(on_crown), 1.0)
        return loss

    return trees_loss


def make_metric(task: str):
    """A per-batch validation metric for the epoch log line."""
    import tensorflow as tf

    if task == "classification":
        def accuracy(y_true, y_pred):
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
            return tf.reduce_mean(tf.cast(tf.argmax(y_pred, axis=-1) == labels, tf.float32))

        return accuracy
    if task in ("landcover", "buildings"):
        def accuracy(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int64)
            valid = tf.cast(labels != IGNORE, tf.float32)
            hit = tf.cast(tf.argmax(y_pred, axis=-1) == labels, tf.float32) * valid
            return tf.reduce_sum(hit) / tf.maximum(tf.reduce_sum(valid), 1.0)

        return accuracy

    def crown_iou(y_true, y_pred):
        crown = y_true[..., 0]
        valid = crown != IGNORE
        truth, pred = valid & ((crown == 1) | (crown == 2)), valid & (y_pred[..., 0] >= 0.5)
        inter = tf.reduce_sum(tf.cast(truth & pred, tf.float32))
        return inter / tf.maximum(tf.reduce_sum(tf.cast(truth | pred, tf.float32)), 1.0)

    return crown_iou


def val_metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics over the whole validation set (numpy, on the exported-to-be model)."""
    if task == "classification":
        truth, guess = y.astype(int), pred.argmax(-1)
        recalls = [np.mean(guess[truth == c] == c) for c in np.unique(truth)]
        return {"val_accuracy": float(np.mean(truth == guess)), "val_balanced_accuracy": float(np.mean(recalls))}
    valid = y[..., 0] != IGNORE
    if task in ("landcover", "buildings"):
        truth, guess = y[..., 0][valid].astype(int), pred.argmax(-1)[valid]
        ious = {c: np.sum((truth == c) & (guess == c)) / np.sum((truth == c) | (guess == c))
                for c in range(pred.shape[-1]) if np.any((truth == c) | (guess == c))}
        metrics = {"val_accuracy": float(np.mean(truth == guess)) if truth.size else 0.0,
                   "val_miou": float(np.mean(list(ious.values()))) if ious else 0.0}
        if task == "buildings":
            metrics["val_building_iou"] = float(ious.get(1, 0.0))
        return metrics
    truth, guess = ((y[..., 0] == 1) | (y[..., 0] == 2)) & valid, (pred[..., 0] >= 0.5) & valid
    union = np.sum(truth | guess)
    metrics = {"val_crown_iou": float(np.sum(truth & guess) / union) if union else 0.0,
               "val_heatmap_mae": float(np.mean(np.abs(pred[..., 1] - y[..., 1] / 255.0)[valid])) if valid.any() else 0.0}
    from ..vector.crown_metrics import CrownScore, crown_boxes, match_boxes, truth_boxes_from_mask

    score = CrownScore()
    for yi, pi in zip(y, pred):
        score = score.add(match_boxes(crown_boxes(pi[..., 0], pi[..., 1], valid=yi[..., 0] != IGNORE),
                                      truth_boxes_from_mask(yi.transpose(2, 0, 1))))
    metrics |= score.as_dict("val_crown_")
    if pred.shape[-1] > 2:  # dead channel: accuracy of dead/live on true crown pixels
        dead_truth, dead_guess = (y[..., 0] == 2)[truth], (pred[..., 2] >= 0.5)[truth]
        metrics["val_dead_accuracy"] = float(np.mean(dead_truth == dead_guess)) if truth.any() else 0.0
    return metrics


def class_scores(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> dict:
    """Land cover: the validation confusion matrix (rows truth, columns prediction, pixels) and
    per-class precision, recall and F1; the weakest class is the lowest F1 among those validated."""
    valid = y[..., 0] != IGNORE
    n = len(class_names)
    truth, guess = y[..., 0][valid].astype(np.int64), pred.argmax(-1)[valid]
    confusion = np.bincount(truth * n + guess, minlength=n * n).reshape(n, n)
    per_class = {}
    for i, name in enumerate(class_names):
        hit, truths, guesses = confusion[i, i], confusion[i].sum(), confusion[:, i].sum()
        if not truths:
            continue  # not in validation: nothing to score
        precision, recall = (hit / guesses if guesses else 0.0), hit / truths
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "pixels": int(truths)}
    weakest = min(per_class, key=lambda k: per_class[k]["f1"]) if per_class else ""
    return {"val_classes": per_class, "val_confusion": confusion.tolist(), "weakest_class": weakest}
