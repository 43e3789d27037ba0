"""Why does shapes-exists ("Is there a red circle?") stay at chance in `kopru compare`? Two measurements.

The task's "no" answers are near misses (the asked colour on another shape, or the asked shape in another
colour; `kopru.data.synthetic._exists_query`), so the answer needs a comparison of colour *and* shape of the
same group, not a lookup. This script separates "the encoder does not see it" from "the model cannot learn the
comparison in the steps it gets":

Part 1 (probes, ~15 s with the data and features): linear probes (scikit-learn logistic regression) on the
frozen shipped tiny encoder's patch features, layers -2 and -1: each patch's colour and shape (patches whose
centre lies in an occupied cell), and per image twelve "present(colour, shape)" probes on max-pooled patches;
the exists answer is read off the probe of the asked (colour, shape). Each figure comes with its majority
baseline.

Part 2 (learning the comparison): a small pre-LN transformer (4 layers, width 128, 4 heads, causal, classifier on
the last token; AdamW, 10 warmup steps then cosine, batch 32) trained from scratch on exists questions alone, the
image as (a) oracle cell features (the true colour/shape one-hots and count of each of the 9 grid cells) or (b) the
frozen encoder's patch features (layer --layer, a trained Linear), the question as word tokens in English and
Turkish (the realistic setting) or optionally as 2 id tokens (colour, shape; English samples only, since the ids
are the same for both languages). One model per step count (the schedule depends on it); 75 steps is the exists
share of compare's 300-step mixed run. Prints held-out accuracy (all / en / tr) with chance.

Data: the exists questions of shapes_dataset(1200, seed=0, split="train") and shapes_dataset(500, seed=1,
split="test"); images through the encoder's own preprocessor config (kopru.image_processing).

    python scripts/exists_diagnostic.py                          # both parts, default settings (~7 min on 1 thread)
    python scripts/exists_diagnostic.py --parts probes           # part 1 only
    python scripts/exists_diagnostic.py --parts learn --features oracle --questions words,ids --steps 75 300 900
    python scripts/exists_diagnostic.py --train-scenes 100 --test-scenes 50 --steps 20 --json runs/exists.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from kopru.backbones import default_backbones
from kopru.config import VisionTowerConfig
from kopru.data.synthetic import CELLS, COLOURS, MAX_COUNT, SHAPES, cell_bounds, shapes_dataset
from kopru.image_processing import ImagePreprocessor
from kopru.vision import load_vision_encoder

TASK = "shapes-exists"
PROBE_LAYERS = (-2, -1)
FEATURES = ("oracle", "encoder")
QUESTIONS = ("words", "ids")
PARTS = ("probes", "learn")
BATCH = 32
WARMUP = 10
PAD, UNKNOWN = 0, 1  # word-token ids; words start at 2


@dataclass
class ExistsData:
    """The exists questions of one split, one row per question (two per scene: en and tr)."""

    scene: np.ndarray  # [N] index into `images`
    cells: np.ndarray  # [N, 9, 8] oracle: colour one-hot (4), shape one-hot (3), count / MAX_COUNT per grid cell
    query: np.ndarray  # [N, 2] asked colour index, shape index
    answer: np.ndarray  # [N] 1 = yes
    language: np.ndarray  # [N] 0 = en, 1 = tr
    question: list[str]
    present: np.ndarray  # [scenes, 12] 1 where (colour c, shape s) is in the scene, column c * 3 + s
    patch_colour: np.ndarray  # [scenes, patches] colour index of the group whose cell holds the patch centre, -1
    patch_shape: np.ndarray  # [scenes, patches] likewise the shape
    images: list[Image.Image]  # one per scene


def exists_data(num_scenes: int, seed: int, split: str, image_size: int, patch_size: int) -> ExistsData:
    """The exists questions of shapes_dataset(num_scenes, seed, split) with oracle and patch labels."""
    samples = [s for s in shapes_dataset(num_scenes, seed=seed, split=split) if s.meta["task"] == TASK]
    side = image_size // patch_size
    # The cell a patch belongs to is the one holding its centre; the cell boxes are the dataset's own.
    centres = (np.arange(side) + 0.5) * patch_size
    image_ids: dict[int, int] = {}
    images, present, patch_colour, patch_shape = [], [], [], []
    scene, cells, query, answer, language, question = [], [], [], [], [], []
    for sample in samples:
        image = sample.images[0]
        if id(image) not in image_ids:  # the languages of one scene share one PIL image
            image_ids[id(image)] = len(images)
            images.append(image)
            present.append(np.zeros(len(COLOURS) * len(SHAPES), np.float32))
            colour_map = np.full((side, side), -1, np.int64)
            shape_map = np.full((side, side), -1, np.int64)
            for group in sample.meta["scene"]:
                c, s = COLOURS.index(group["colour"]), SHAPES.index(group["shape"])
                present[-1][c * len(SHAPES) + s] = 1
                x0, y0, x1, y1 = cell_bounds(group["region"], image_size)  # half-open box
                rows = (centres >= y0) & (centres < y1)
                cols = (centres >= x0) & (centres < x1)
                colour_map[np.ix_(rows, cols)] = c
                shape_map[np.ix_(rows, cols)] = s
            patch_colour.append(colour_map.ravel())
            patch_shape.append(shape_map.ravel())
        grid = np.zeros((9, len(COLOURS) + len(SHAPES) + 1), np.float32)
        for group in sample.meta["scene"]:
            row, col = CELLS[group["region"]]
            grid[row * 3 + col, COLOURS.index(group["colour"])] = 1
            grid[row * 3 + col, len(COLOURS) + SHAPES.index(group["shape"])] = 1
            grid[row * 3 + col, -1] = group["count"] / MAX_COUNT
        subject = sample.meta["subject"]
        scene.append(image_ids[id(image)])
        cells.append(grid)
        query.append((COLOURS.index(subject["colour"]), SHAPES.index(subject["shape"])))
        answer.append(int(sample.meta["answer"] in ("yes", "evet")))
        language.append(int(sample.meta["language"] == "tr"))
        question.append(sample.messages[0]["content"].split("\n", 1)[1])
    return ExistsData(np.array(scene), np.stack(cells), np.array(query), np.array(answer), np.array(language),
                      question, np.stack(present), np.stack(patch_colour), np.stack(patch_shape), images)


# ---------------------------------------------------------------------------------------------------- encoder
def encoder_features(encoder: nn.Module, preprocessor: ImagePreprocessor, images: list[Image.Image],
                     layers: tuple[int, ...], batch: int = 100) -> dict[int, torch.Tensor]:
    """Hidden states [scenes, tokens, width] of the frozen encoder at each of `layers` (CLS first)."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc="encoder features", leave=False, file=sys.stderr):
            hidden = encoder(pixel_values=preprocessor(images[start:start + batch]),
                             output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hidden[layer])
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def preprocessing_difference(preprocessor: ImagePreprocessor, image: Image.Image) -> float:
    """Largest difference between Köprü's pixels and the earlier hand-written x / 255 * 2 - 1 (should be 0)."""
    manual = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255 * 2 - 1
    return float((preprocessor([image])[0] - manual).abs().max())


# ---------------------------------------------------------------------------------------------------- part 1
def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def _probability(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """P(label = 1) from a binary probe; a label constant in training (tiny runs) is predicted as that constant."""
    if len(np.unique(train_y)) < 2:
        return np.full(len(test_x), float(train_y[0]))
    return _probe().fit(train_x, train_y).predict_proba(test_x)[:, 1]


def _majority(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / len(labels))


def run_probes(train: ExistsData, test: ExistsData, features: dict[str, dict[int, torch.Tensor]]) -> list[dict]:
    rows = []
    english = test.language == 0  # one question per scene
    for layer in PROBE_LAYERS:
        x_train = features["train"][layer][:, 1:].numpy()  # patches only, CLS dropped
        x_test = features["test"][layer][:, 1:].numpy()
        for name, train_labels, test_labels in (("patch colour", train.patch_colour, test.patch_colour),
                                                ("patch shape", train.patch_shape, test.patch_shape)):
            a, b = train_labels >= 0, test_labels >= 0
            probe = _probe().fit(x_train[a], train_labels[a])
            rows.append(dict(layer=layer, probe=name, accuracy=float(probe.score(x_test[b], test_labels[b])),
                             majority=_majority(test_labels[b]), n_test=int(b.sum())))
        pooled_train, pooled_test = x_train.max(1), x_test.max(1)
        probability = np.stack([_probability(pooled_train, train.present[:, k], pooled_test)
                                for k in range(train.present.shape[1])], 1)
        accuracies = ((probability > 0.5) == test.present).mean(0)
        majorities = np.maximum(test.present.mean(0), 1 - test.present.mean(0))
        rows.append(dict(layer=layer, probe="present(c,s) x12, max-pool", accuracy=float(accuracies.mean()),
                         majority=float(majorities.mean()), min_accuracy=float(accuracies.min()),
                         n_test=len(test.images)))
        query = test.query[english]
        asked = probability[test.scene[english], query[:, 0] * len(SHAPES) + query[:, 1]]
        answers = test.answer[english]
        rows.append(dict(layer=layer, probe="exists read off present(c,s)",
                         accuracy=float(((asked > 0.5) == answers).mean()), majority=_majority(answers),
                         n_test=int(english.sum())))
    return rows


# ---------------------------------------------------------------------------------------------------- part 2
class ExistsNet(nn.Module):
    """Image tokens then question tokens through a causal pre-LN transformer; 2-way classifier on the last token."""

    def __init__(self, image_width: int, image_tokens: int, question_tokens: int, vocab_size: int,
                 width: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.image_in = nn.Linear(image_width, width)
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(image_tokens + question_tokens, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(image_tokens + question_tokens))

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.image_in(image), self.embed(question)], 1) + self.position
        return self.head(self.norm(self.blocks(x, mask=self.mask, is_causal=True)[:, -1]))


def _words(text: str) -> list[str]:
    return text.lower().replace("?", "").split()


def question_tokens(data: ExistsData, kind: str, vocabulary: dict[str, int], length: int) -> torch.Tensor:
    if kind == "ids":  # colour ids 1-4, shape ids 5-7
        return torch.tensor(data.query + np.array([1, 1 + len(COLOURS)]))
    tokens = torch.full((len(data.question), length), PAD, dtype=torch.long)
    for i, text in enumerate(data.question):
        ids = [vocabulary.get(word, UNKNOWN) for word in _words(text)][-length:]
        tokens[i, length - len(ids):] = torch.tensor(ids)  # left-padded, so the last token is the question's
    return tokens


def image_inputs(data: ExistsData, kind: str, encoder_layer: torch.Tensor | None) -> torch.Tensor:
    if kind == "oracle":
        return torch.from_numpy(data.cells)
    assert encoder_layer is not None
    return encoder_layer[torch.from_numpy(data.scene), 1:]  # the scene's patches, CLS dropped


def train_and_test(train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...], vocab_size: int, steps: int,
                   lr: float, seed: int, label: str) -> dict:
    """Train one ExistsNet for `steps` steps; held-out accuracy overall and per language, and the train figures."""
    image, question, answer, _ = train
    torch.manual_seed(seed)
    batches = torch.Generator().manual_seed(seed)
    net = ExistsNet(image.shape[-1], image.shape[1], question.shape[1], vocab_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / WARMUP if s < WARMUP
        else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / max(1, steps - WARMUP))))
    losses = []
    start = time.time()
    for _ in tqdm(range(steps), desc=label, leave=False, file=sys.stderr):
        index = torch.randint(0, len(answer), (BATCH,), generator=batches)
        loss = nn.functional.cross_entropy(net(image[index], question[index]), answer[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    net.eval()

    def accuracy(data: tuple[torch.Tensor, ...]) -> dict[str, float]:
        with torch.no_grad():
            right = (net(data[0], data[1]).argmax(-1) == data[2]).float()
        result = {"all": float(right.mean())}
        for code, name in ((0, "en"), (1, "tr")):
            if (data[3] == code).any():
                result[name] = float(right[data[3] == code].mean())
        return result

    return dict(train_loss_last50=float(np.mean(losses[-50:])), train_accuracy=accuracy(train)["all"],
                test=accuracy(test), chance=_majority(test[2].numpy()), seconds=round(time.time() - start, 1))


def run_learning(train: ExistsData, test: ExistsData, features: dict[str, dict[int, torch.Tensor]] | None,
                 args: argparse.Namespace) -> list[dict]:
    vocabulary: dict[str, int] = {}
    for text in train.question:
        for word in _words(text):
            vocabulary.setdefault(word, len(vocabulary) + 2)
    length = max(len(_words(text)) for text in train.question)
    rows = []
    for feature in args.features:
        for kind in args.questions:
            split_data = {}
            for name, data in (("train", train), ("test", test)):
                keep = torch.from_numpy(data.language == 0) if kind == "ids" else torch.ones(len(data.answer), dtype=bool)
                layer = features[name][args.layer] if feature == "encoder" else None
                split_data[name] = tuple(t[keep] for t in (
                    image_inputs(data, feature, layer), question_tokens(data, kind, vocabulary, length),
                    torch.from_numpy(data.answer), torch.from_numpy(data.language)))
            if feature == "encoder":  # frozen residual-stream features have large norms: one scalar scale from train
                mean, std = split_data["train"][0].mean(), split_data["train"][0].std()
                split_data = {k: ((v[0] - mean) / std, *v[1:]) for k, v in split_data.items()}
            vocab_size = len(vocabulary) + 2 if kind == "words" else 1 + len(COLOURS) + len(SHAPES)
            for steps in args.steps:
                label = f"{feature} {kind} {steps} steps"
                result = train_and_test(split_data["train"], split_data["test"], vocab_size, steps, args.lr,
                                        args.seed, label)
                rows.append(dict(features=feature, layer=args.layer if feature == "encoder" else None,
                                 questions=kind, languages="en" if kind == "ids" else "en+tr", steps=steps,
                                 lr=args.lr, seed=args.seed, **result))
                print(_learn_line(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- output
def _learn_line(row: dict) -> str:
    name = "oracle cells" if row["features"] == "oracle" else f"encoder layer {row['layer']}"
    test = row["test"]
    per_language = " ".join(f"{k}={test[k]:.3f}" for k in ("en", "tr") if k in test)
    return (f"{name:17s} {row['questions']:5s} {row['languages']:5s} {row['steps']:5d} steps  "
            f"held-out {test['all']:.3f} ({per_language})  chance {row['chance']:.3f}  "
            f"train {row['train_accuracy']:.3f}  {row['seconds']:.0f}s")


def _probe_table(rows: list[dict]) -> str:
    lines = [f"{'layer':>5s}  {'probe':32s} {'accuracy':>8s} {'majority':>8s}  n"]
    for row in rows:
        extra = f"  (min {row['min_accuracy']:.3f})" if "min_accuracy" in row else ""
        lines.append(f"{row['layer']:5d}  {row['probe']:32s} {row['accuracy']:8.3f} {row['majority']:8.3f}  "
                     f"{row['n_test']}{extra}")
    return "\n".join(lines)


def _csv(choices: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{what} expects a comma-separated subset of {list(choices)}, "
                                             f"found {text!r}")
        return values
    return parse


def _default_feature_layer() -> int:
    default = {f.name: f.default for f in fields(VisionTowerConfig)}["feature_layer"]
    return default if isinstance(default, int) else default[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--parts", type=_csv(PARTS, "--parts"), default=list(PARTS),
                        help="which parts to run: probes, learn or both (default probes,learn)")
    parser.add_argument("--features", type=_csv(FEATURES, "--features"), default=list(FEATURES),
                        help="part 2's image input: oracle cells, the frozen encoder's patches (default both)")
    parser.add_argument("--questions", type=_csv(QUESTIONS, "--questions"), default=["words"],
                        help="part 2's question input: words (en+tr word tokens, default), ids (2 tokens, en)")
    parser.add_argument("--steps", type=int, nargs="+", default=[75, 300, 900],
                        help="part 2: train one model per step count (default 75 300 900; batch 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="part 2: AdamW peak learning rate (default 1e-3)")
    parser.add_argument("--layer", type=int, default=_default_feature_layer(),
                        help="part 2: encoder hidden-state layer (default: Köprü's feature_layer, -2)")
    parser.add_argument("--seed", type=int, default=0, help="part 2: initialisation and batch-order seed")
    parser.add_argument("--train-scenes", type=int, default=1200, help="scenes of the train split (default 1200)")
    parser.add_argument("--test-scenes", type=int, default=500, help="scenes of the held-out split (default 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="write every figure (and the settings) to this JSON file")
    args = parser.parse_args(argv)
    for name in ("train_scenes", "test_scenes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} expects a positive integer, found {getattr(args, name)}")
    if any(steps < 1 for steps in args.steps):
        parser.error(f"--steps expects positive step counts, found {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    encoder_path = default_backbones()["vision"]
    encoder = load_vision_encoder(str(encoder_path)).eval()
    config = encoder.config
    preprocessor = ImagePreprocessor.from_pretrained(encoder_path, model_type=config.model_type)
    train = exists_data(args.train_scenes, 0, "train", config.image_size, config.patch_size)
    test = exists_data(args.test_scenes, 1, "test", config.image_size, config.patch_size)
    difference = preprocessing_difference(preprocessor, train.images[0])
    print(f"exists questions: train {len(train.answer)} ({len(train.images)} scenes, yes {train.answer.mean():.3f}),"
          f" held-out {len(test.answer)} ({len(test.images)} scenes, yes {test.answer.mean():.3f}); "
          f"encoder {encoder_path}; preprocessing vs x/255*2-1: max difference {difference:g}", flush=True)
    need_encoder = "probes" in args.parts or "encoder" in args.features
    layers = tuple(sorted(set(PROBE_LAYERS) | {args.layer}))
    features = ({name: encoder_features(encoder, preprocessor, data.images, layers)
                 for name, data in (("train", train), ("test", test))} if need_encoder else None)
    result: dict = dict(settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        data=dict(train_questions=len(train.answer), train_scenes=len(train.images),
                                  test_questions=len(test.answer), test_scenes=len(test.images),
                                  train_yes=float(train.answer.mean()), test_yes=float(test.answer.mean())),
                        encoder=str(encoder_path), preprocessing_max_difference=difference)
    if "probes" in args.parts:
        result["probes"] = run_probes(train, test, features)
        print("\nPart 1: linear probes on the frozen encoder (held-out split)\n" + _probe_table(result["probes"]),
              flush=True)
    if "learn" in args.parts:
        print(f"\nPart 2: 4-layer width-128 transformer trained on exists alone (lr {args.lr}, batch {BATCH}, "
              f"seed {args.seed})", flush=True)
        result["learn"] = run_learning(train, test, features, args)
    result["seconds"] = round(time.time() - started, 1)
    print(f"\n{result['seconds']:.0f} s in all", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
