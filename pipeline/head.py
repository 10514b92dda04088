"""The head: a linear classifier trained on selected columns read from the store, per-layer re-normalised."""
from __future__ import annotations

import json
import math
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn.utils import skip_init
from torch.optim.adam import adam  # the functional form of torch.optim.Adam

from .config import ModelConfig
from .errors import H2TError
from .rows import Rows
from .score.matrix import cast_into, chunk_runs, gather_columns_into, normalise_rows_in_place

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # head.precision: the products' dtype
# Fewest columns the weights have in the matrix products: the heads' own, then zero columns. MKL's products of a
# 128-row batch with fewer than 16 columns ran 2.5-4x slower than with 16 on this AVX-512 CPU (one head of 10
# classes: 11.9 ms a step against 4.3 ms padded, d = 20,000; benchmarks/README.md), and a padded column's
# gradient, Adam update and weights stay exactly 0.
MIN_PRODUCT_COLUMNS = 16


def read_columns(store, rows: Rows | str, plan: dict[str, np.ndarray], view=None, part: slice = slice(None),
                 block_rows: int = 512, normalise: bool = True) -> np.ndarray:
    """Only the planned columns of each layer, for `rows` (a split's name or a Rows selection; `part`: a
    range of those rows), each layer's subset L2-normalised per example, concatenated in plan order
    (layers in store order, columns ascending), as float32.

    With a column view (pipeline/storage/views.py) whose prefix holds exactly the planned columns, the
    values come from that prefix: a contiguous read of about the selected bytes. The numbers are the
    same either way. Memory: the float32 result and one block of raw values (of the planned columns' inner
    chunks, at most `block_rows` x the layer's width: `column_subset`). `normalise=False` keeps the
    raw values (`normalise_layers` applies the normalisation to any subset of them later)."""
    rows = Rows.of(store, rows) if isinstance(rows, str) else rows
    start, stop, _ = part.indices(rows.size(store))
    sizes = [len(cols) for cols in plan.values()]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = np.empty((stop - start, int(bounds[-1])), np.float32)
    order = _view_order(store, plan, view) if view is not None else None
    align = 1
    if order is not None:  # whole inner chunks of the view: none is decoded twice
        block_rows = align = view.group[rows.parts[0][0]].chunks[0]
    for segment in rows.segments(store, block_rows, align, part):
        target = out[segment.dst.start - start:segment.dst.stop - start]
        if order is not None:
            raw = view.read(segment.split, len(order), segment.src)
            gather_columns_into(target, raw if segment.take is None else raw[segment.take], order)
        else:
            for (layer, cols), a, b in zip(plan.items(), bounds[:-1], bounds[1:]):
                values = column_subset(store.features(segment.split, layer), segment.src, cols)
                values = values if segment.take is None else values[segment.take]
                cast_into(target[:, a:b], store.decode(layer, values))
        if normalise:
            normalise_layers(target, plan)
    return out


def column_subset(array, rows: slice, cols: np.ndarray) -> np.ndarray:
    """`array[rows][:, cols]`: ascending columns as the scoring matrix reads them (`score.matrix.chunk_runs`),
    each run of adjacent inner chunks one slice, taken in memory; columns out of order by zarr's orthogonal
    selection."""
    cols = np.asarray(cols)
    if len(cols) == 0:
        return array[rows, 0:0]
    if np.any(np.diff(cols) <= 0):
        return array.get_orthogonal_selection((rows, cols))
    parts = []
    for run in chunk_runs(cols, int(array.chunks[1])):
        lo, hi = int(cols[run[0]]), int(cols[run[-1]]) + 1
        slab = array[rows, lo:hi]
        parts.append(slab if hi - lo == len(run) else slab[:, cols[run] - lo])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def normalise_layers(X: np.ndarray, plan: dict[str, np.ndarray]) -> np.ndarray:
    """L2-normalise each layer's columns of X (laid out in plan order) per row, in place."""
    bounds = np.cumsum([0] + [len(cols) for cols in plan.values()])
    for a, b in zip(bounds[:-1], bounds[1:]):
        normalise_rows_in_place(X[:, a:b])
    return X


def plan_positions(outer: dict[str, np.ndarray], inner: dict[str, np.ndarray]) -> np.ndarray:
    """Where each column of `inner` (a sub-plan of `outer`) sits in `outer`'s plan-order layout."""
    offsets = dict(zip(outer, np.cumsum([0] + [len(cols) for cols in outer.values()])))
    return np.concatenate([offsets[layer] + np.searchsorted(outer[layer], cols) for layer, cols in inner.items()])


def _view_order(store, plan: dict[str, np.ndarray], view) -> np.ndarray | None:
    """Positions in the view's prefix of the plan's columns, in plan order; None when the prefix holds
    other columns (the features are then read directly)."""
    offsets = {layer["name"]: layer["offset"] for layer in store.layers}
    wanted = np.concatenate([offsets[layer] + cols for layer, cols in plan.items()])
    k = len(wanted)
    if k > view.width:
        return None
    prefix = view.columns[:k]
    order = np.argsort(prefix, kind="stable")
    return order if np.array_equal(prefix[order], wanted) else None


def evaluate(head, store, rows: Rows | str, plan: dict[str, np.ndarray], view=None, block_rows: int = 4096) -> float:
    """Accuracy on some rows read in blocks: memory holds one block of the selected columns."""
    rows = Rows.of(store, rows) if isinstance(rows, str) else rows
    labels = rows.labels(store)
    correct = 0
    for r0 in range(0, len(labels), block_rows):
        part = slice(r0, min(r0 + block_rows, len(labels)))
        correct += int((predict(head, read_columns(store, rows, plan, view, part)) == labels[part]).sum())
    return correct / len(labels)


def train_linear_head(X: np.ndarray, y: np.ndarray, num_classes: int, lr: float, steps: int,
                      batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
                      precision: str = "float32") -> torch.nn.Linear:
    """Unregularised softmax regression: Adam (0.9, 0.999, eps 1e-7), cosine decay to 0; batches follow one
    seeded permutation per epoch (`epoch_batches`), so every row is trained on every epoch."""
    return train_linear_heads(X, y, num_classes, [(lr, steps)], batch_size, seed, device, precision)[0]


def train_linear_heads(X: np.ndarray, y: np.ndarray, num_classes: int, settings: Sequence[tuple[float, int]],
                       batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
                       precision: str = "float32") -> list[torch.nn.Linear]:
    """One head per (lr, steps) of `settings`, all on the same rows, trained as one computation.

    Each head is what `train_linear_head` alone gives (tests/test_head.py compares them with torch's own
    Adam): the same seeded batches (they depend on the rows and the seed only), its own learning rate and
    cosine schedule, Adam's moments per head. The heads' weights sit side by side in one (d, heads x K)
    matrix, so a step gathers the batch once and does two matrix products for all of them; the gradient of
    the mean cross-entropy is written out (softmax - one-hot) instead of recorded by autograd, and Adam is
    torch's fused kernel over all of them at once. On `device` (a GPU when there is one).

    `precision` (`head.precision`) is the dtype of the two matrix products: with "bfloat16" the rows and, at each
    step, the weights and the gradient of the logits enter them rounded to bfloat16 (sums in float32, the results
    rounded to bfloat16), while the weights, Adam's moments, the bias and the softmax stay float32: the usual
    mixed-precision recipe. Where the CPU has bfloat16 dot products (avx512_bf16, AMX) or on a GPU the products
    take about half the time. On real selected columns the weights moved by 1-2 % of the largest, and a tune's
    validation accuracies 2.6-5x less than a change of `head.seed` moves them (benchmarks/README.md, tune_cost.py
    --precisions --seeds)."""
    return train_stacked_heads([X], y, num_classes, settings, batch_size, seed, device, precision)[0]


def train_stacked_heads(Xs: Sequence[np.ndarray | torch.Tensor], y: np.ndarray, num_classes: int,
                        settings: Sequence[tuple[float, int]], batch_size: int, seed: int = 0,
                        device: str | torch.device = "cpu", precision: str = "float32") -> list[list[torch.nn.Linear]]:
    """`train_linear_heads` for several column sets of the same rows at once (one tune round's selections:
    every lam and F): set g's heads are `result[g]`, one per setting.

    The sets are zero-padded to the widest and stacked, so a step is one batched gather, two batched matrix
    products and one Adam pass for every head of every set. A padded column's gradient is exactly 0, so is its
    Adam update, and its weights stay 0: each head is the one trained alone, up to the order of the products'
    sums. Padding costs the widest width's arithmetic for every set (2.35x the default F grid's), which a GPU
    absorbs and a CPU does not: `head.stack` chooses (tune.py). `precision`: as in `train_linear_heads`."""
    device = torch.device(device)
    if not Xs:
        return []
    G, n = len(Xs), len(y)
    widths = [X.shape[1] for X in Xs]
    m, K = len(settings), int(num_classes)
    steps = [int(s) for _, s in settings]
    compute = PRECISIONS[str(precision)]
    Xt = stack_padded(Xs, device, compute)
    d = Xt.shape[2]
    labels = torch.as_tensor(np.asarray(y, np.int64))
    one_hot = torch.zeros(n, K).index_put_((torch.arange(n), labels), torch.tensor(1.0)).to(device)
    width = _product_width(m * K)
    W = torch.zeros(G, d, width, device=device)
    b = torch.zeros(G, 1, width, device=device)
    # What a step needs besides its arithmetic is made before the loop (per-step bookkeeping was most of a
    # narrow head's time): every batch's rows, and each head's lr at every step (LambdaLR's cosine factor of
    # the steps taken so far, in float64, then float32) repeated over its K columns.
    total = max(steps, default=0)
    draws = list(epoch_batches(n, batch_size, total, torch.Generator().manual_seed(seed)))
    batches = torch.stack(draws).to(device) if draws else torch.empty(0, 0, dtype=torch.long)
    lrs = torch.tensor([[float(lr) * (0.5 * (1 + math.cos(math.pi * t / max(s, 1))))
                         for (lr, _), s in zip(settings, steps)] for t in range(total)], dtype=torch.float64)
    lrs = lrs.reshape(total, m)
    scales = _pad_columns(lrs.to(torch.float32).repeat_interleave(K, dim=1), width).to(device)
    # Adam runs on a scratch copy of each parameter reset to 0 before every step, so that after the step it
    # holds -m_hat / (sqrt(v_hat) + eps) (lr 1, torch's fused kernel: one pass); each head's own lr and
    # schedule then scale its columns of that update into the weights.
    adam = ScratchAdam([W, b])
    active = list(range(m))  # the heads still training, in the order of their columns
    finished: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    # The two large per-step results (the batch's rows, the weights' gradient) go into buffers made once (and
    # again when the heads narrow): a fresh one each step cost page faults (the allocator handed the memory
    # back to the kernel in between). `product` is the gradient in the products' dtype.
    xb = torch.empty(G, batches.shape[1] if total else 0, d, dtype=compute, device=device)

    def gradient_buffers(W: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The weights' gradient, the same in the products' dtype, and the logits' gradient with its zero
        padding columns (None when the `heads` fill the width)."""
        grad_W = torch.empty_like(W)
        padded = torch.zeros(G, xb.shape[1], W.shape[-1], device=device) if W.shape[-1] > heads * K else None
        return grad_W, grad_W if compute == torch.float32 else torch.empty_like(W, dtype=compute), padded

    grad_W, product, padded = gradient_buffers(W, m)
    for t in range(total):
        if any(steps[h] == t for h in active):  # heads done: their weights are final, the others go on narrower
            keep = [i for i, h in enumerate(active) if steps[h] > t]
            for i, h in enumerate(active):
                if steps[h] == t:
                    finished[h] = (W[..., i * K:(i + 1) * K].clone(), b[..., i * K:(i + 1) * K].clone())
            columns = (torch.tensor(keep)[:, None] * K + torch.arange(K)).reshape(-1).to(device)
            width = _product_width(len(columns))
            W, b = _pad_columns(W[..., columns], width), _pad_columns(b[..., columns], width)
            adam.narrow(columns, width)
            scales = _pad_columns(scales[:, columns], width)
            active = [active[i] for i in keep]
            grad_W, product, padded = gradient_buffers(W, len(active))
        with torch.no_grad():
            idx = batches[t]
            torch.index_select(Xt, 1, idx, out=xb)  # 4x faster than Xt[:, idx] on the CPU
            if compute == torch.float32:
                logits = torch.baddbmm(b, xb, W)
            else:
                logits = torch.bmm(xb, W.to(compute)).float().add_(b)
            real = len(active) * K  # the heads' columns; any after them are padding
            grad = torch.softmax(logits[..., :real].reshape(G, len(idx), len(active), K), dim=3)
            grad.sub_(torch.index_select(one_hot, 0, idx)[None, :, None, :])
            grad = grad.view(G, len(idx), real).div_(len(idx))  # d(mean cross-entropy) / d(logits)
            if padded is not None:
                padded[..., :real] = grad
                grad = padded
            torch.bmm(xb.transpose(1, 2), grad.to(compute), out=product)
            if product is not grad_W:
                grad_W.copy_(product)
            update_W, update_b = adam.step([grad_W, grad.sum(1, keepdim=True)])
            W.addcmul_(update_W, scales[t])
            b.addcmul_(update_b, scales[t])
    for i, h in enumerate(active):
        finished[h] = (W[..., i * K:(i + 1) * K], b[..., i * K:(i + 1) * K])
    # every parameter is overwritten below: no random initialisation (1-2 ms a wide head, 68 heads a tune round)
    heads = [[skip_init(torch.nn.Linear, widths[g], K) for _ in range(m)] for g in range(G)]
    with torch.no_grad():
        for g in range(G):
            for h, head in enumerate(heads[g]):
                head.weight.copy_(finished[h][0][g, :widths[g]].T)
                head.bias.copy_(finished[h][1][g, 0])
    return heads


def stack_padded(Xs: Sequence[np.ndarray | torch.Tensor], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sets (rows x their own columns, the same rows) as one (sets, rows, widest) tensor on `device`, each
    zero-padded to the widest. Each set travels as it is (numpy rows or tensors already there) and is padded
    where it lands: no padded copy on the host, and only the sets' own bytes cross to a device."""
    if len(Xs) == 1 and isinstance(Xs[0], np.ndarray) and device.type == "cpu" and dtype == torch.float32:
        return torch.as_tensor(np.ascontiguousarray(Xs[0], dtype=np.float32))[None]  # the caller's rows as they are
    rows, widest = Xs[0].shape[0], max(X.shape[1] for X in Xs)
    if any(X.shape[0] != rows for X in Xs):
        raise ValueError(f"stack_padded: the sets must share their rows, got {[X.shape[0] for X in Xs]}")
    out = (torch.zeros if len(Xs) > 1 else torch.empty)(len(Xs), rows, widest, dtype=dtype, device=device)
    for g, X in enumerate(Xs):
        out[g, :, :X.shape[1]].copy_(X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X, np.float32)))
    return out


def stacked_accuracies(heads: Sequence[Sequence[torch.nn.Linear]], Xs: Sequence[torch.Tensor],
                       y: np.ndarray) -> list[list[float]]:
    """`accuracy` of every head of every set (`heads[g]` on the rows `Xs[g]`, a tensor on the device that trains
    them), each set's heads in one product there and every count read back at once: a round's accuracies
    without taking its rows back to the host. Equal to `accuracy` up to the products' rounding (a logit's last
    bits can differ, so a near-tie can fall the other way); no rows give NaN, as `accuracy` does."""
    if not Xs:
        return []
    labels = torch.as_tensor(np.asarray(y, np.int64)).to(Xs[0].device)
    counts = []
    with torch.no_grad():
        for per_set, X in zip(heads, Xs):
            W = torch.cat([h.weight for h in per_set]).T.to(X.device)  # (columns, heads x K)
            b = torch.cat([h.bias for h in per_set]).to(X.device)
            logits = torch.addmm(b, X.float(), W).view(len(X), len(per_set), W.shape[1] // len(per_set))
            counts.append((logits.argmax(2) == labels[:, None]).sum(0))
    return [[int(right) / len(X) if len(X) else float("nan") for right in per_set]
            for per_set, X in zip(torch.stack(counts).tolist(), Xs)]


def normalise_layers_on(X: torch.Tensor, plan: dict[str, np.ndarray]) -> torch.Tensor:
    """`normalise_layers` for a tensor (on any device), in place: each layer's columns of each row divided by
    their L2 norm (zero stays zero). One reduction per layer rather than one scatter-add for all: a CUDA
    scatter-add sums in no fixed order, and a tune must choose the same on the same device every time."""
    bounds = np.cumsum([0] + [len(cols) for cols in plan.values()])
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        block = X[:, a:b]
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
        block.div_(norms.masked_fill_(norms == 0, 1.0))
    return X


def _product_width(columns: int) -> int:
    """Columns of the weights in the products: the heads' `columns`, at least `MIN_PRODUCT_COLUMNS`."""
    return max(columns, MIN_PRODUCT_COLUMNS)


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """x with zero columns appended up to `width` (last axis), contiguous."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x.contiguous()


def head_workers(device: torch.device, workers: int | None = None) -> int:
    """How many of tune's groups of heads train at once (`head.workers`): by default one per torch thread on a
    CPU, one on any other device (a GPU runs one group's GEMMs across all its cores already). Per-layer probes
    use it for their stacked batches of taps (pipeline/probe.py): one narrow tap per worker, each holding the
    GIL between its many small ops, was no faster than one at a time."""
    if workers is not None:
        return int(workers)
    return torch.get_num_threads() if device.type == "cpu" else 1


def stack_heads(device: torch.device, stack: bool | None = None) -> bool:
    """Whether tune trains each round's groups of heads (every lam and F, and the linear probe) as one padded
    computation (`head.stack`): by default on a GPU, where a group's steps are short kernels whose launches, not
    their arithmetic, set the pace; not on a CPU, where the padding's arithmetic is paid in full (the default
    grid's F are 2.35x their sum when padded to the widest) and groups already run one per core."""
    return device.type != "cpu" if stack is None else bool(stack)


@contextmanager
def training_pool(workers: int) -> Iterator[Executor]:
    """Where independent groups of heads are trained: with one worker in the calling thread, as it comes; with
    several, in that many threads at once, each single-threaded. A group's GEMMs are skinny and Adam's passes
    memory-bound, so a second thread adds little to either: on two cores, two groups at once brought the default
    tune to 0.77 of its wall time and the paper's protocol to 0.89 (benchmarks/README.md, tune_cost.py), with
    each head the same as trained alone (tests/test_head.py). Afterwards the torch thread count is as before,
    for this thread and for threads that start later (a worker's `torch.set_num_threads(1)` also sets the
    count new threads begin with)."""
    if workers <= 1:
        yield _CallingThread()
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="h2t-heads", initializer=torch.set_num_threads,
                              initargs=(1,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


class _CallingThread(Executor):
    """An executor that runs each call at once, in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to whoever reads the result, as a pool would
            future.set_exception(exc)
        return future


class ScratchAdam:
    """Adam (0.9, 0.999, eps 1e-7) at lr 1 on zeroed scratch parameters: `step(grads)` returns each
    parameter's update -m_hat / (sqrt(v_hat) + eps), computed by torch's fused kernel through the functional
    form of torch.optim.Adam (the same arithmetic, without the optimiser object's per-step overhead)."""

    def __init__(self, params: list[torch.Tensor]):
        self.updates = [torch.zeros_like(p) for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def step(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        for update in self.updates:
            update.zero_()
        adam(self.updates, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=True, amsgrad=False,
             beta1=0.9, beta2=0.999, lr=1.0, weight_decay=0.0, eps=1e-7, maximize=False)
        return self.updates

    def narrow(self, columns: torch.Tensor, width: int) -> None:
        """Keep the state of some columns only (the heads still training), zero-padded to `width` columns: the
        finished heads' arithmetic stops instead of running on at lr 0 (Adam is elementwise, so the others'
        steps are unchanged)."""
        for state in (self.updates, self.exp_avgs, self.exp_avg_sqs):
            state[:] = [_pad_columns(p[..., columns], width) for p in state]


def epoch_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """The row indices of each of `steps` batches: consecutive slices of a stream of permutations of the n
    rows, one drawn per epoch from `generator`; a batch that crosses an epoch's end continues into the
    next one, so no row is left out of any epoch and every batch is full."""
    batch_size = min(batch_size, n)
    stream = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(stream) < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=generator)])
        yield stream[:batch_size]
        stream = stream[batch_size:]


def predict(head: torch.nn.Linear, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).argmax(1).numpy()


def accuracy(head: torch.nn.Linear, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict(head, X) == np.asarray(y)).mean())


# --- the head file: `<method>.head.pt`, what `h2t predict` applies (pipeline/predict.py) ---------------------
FORMAT = 1


def save_head(path: Path, head: torch.nn.Linear, store, plan: dict[str, np.ndarray], models: list[ModelConfig],
              result: dict) -> Path:
    """The head and what applying it needs, as a weights-only torch file (no pickled code). `models`: the
    model of the store, or of each member of a union (whose file then lists, per backbone, the store it was
    extracted into and its own selected taps under `backbones`)."""
    members = getattr(store, "members", None)
    n_stores = len(members) if members is not None else 1
    if len(models) != n_stores:
        raise H2TError(f"a head of {n_stores} store(s) needs one model each, got {len(models)}")
    artefact = {
        "format": FORMAT, "method": str(result["method"]), **_backbone_entry(store, plan, models[0]),
        "normalisation": "per_layer_l2",
        "weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
        "class_names": list(store.info.class_names or [str(i) for i in range(store.info.num_classes)]),
        "reported": plain_json({k: result.get(k) for k in ("val_accuracy", "test_accuracy", "lam", "fraction")}),
    }
    if members is not None:  # a union: the plan's layers are `<backbone>/<tap>`
        artefact["spec"] = plain_json(store.info.spec)
        artefact["model_cfg"] = None
        artefact["backbones"] = []
        for name, member, model in zip(store.names, members, models):
            prefix = f"{name}/"
            own = {layer[len(prefix):]: cols for layer, cols in plan.items() if layer.startswith(prefix)}
            artefact["backbones"].append({"name": name, **_backbone_entry(member, own, model)})
    torch.save(artefact, path)
    return path


def _backbone_entry(store, plan: dict[str, np.ndarray], model: ModelConfig) -> dict:
    """One backbone's part of a head file: its store, model and selected columns of each tap."""
    by_name = {layer["name"]: layer for layer in store.layers}
    dtypes = store.layer_dtypes()
    return {"store_id": store.id, "spec": plain_json(store.info.spec), "model_cfg": plain_json(asdict(model)),
            "layers": [{"name": name, "role": by_name[name]["role"], "dim": int(by_name[name]["dim"]),
                        "dtype": dtypes[name], "columns": torch.from_numpy(np.asarray(cols, np.int64))}
                       for name, cols in plan.items()]}


def plain_json(value):
    """A value as JSON holds it (enums and paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def load_head(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise H2TError(f"head file {path}: no such file (probe, run and tune write <method>.head.pt)")
    try:
        artefact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise H2TError(f"head file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(artefact, dict) or artefact.get("format") != FORMAT:
        raise H2TError(f"head file {path} is not an h2t head (format {FORMAT})")
    return artefact
