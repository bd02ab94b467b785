"""trainer.step_graphs: what decides which recorded CUDA graph a micro-batch replays, and the copy into its inputs.

The recording and replay themselves need CUDA: ``bench/bench_train_step.py`` with a ``_graphed`` kind compares a
replayed micro-batch's loss and gradients against the same micro-batch run directly on the device."""
import pytest
import torch

from trainer.step_graphs import InputBuffers, MicroBatchGraphs, copy_into, layout


def batch(rows: int = 2, length: int = 5, has_padding: bool = True, keys=("a", "b")) -> dict:
    return {"input_ids": torch.arange(rows * length).view(rows, length), "has_padding": has_padding,
            "image_max_seqlen": 64, "keys": list(keys), "step": 3,
            "anchors": {"sam": {"rows": torch.arange(rows), "views": None,
                                "targets": {"masks": torch.zeros(rows, 8, 4, 4, dtype=torch.bool)}}}}


def test_layout_keys_on_shapes_dtypes_and_host_values_not_on_tensor_values_or_names():
    base = layout(batch())
    other_values = batch()
    other_values["input_ids"] += 7
    assert layout(other_values) == base  # the replay copies the values in
    assert layout(batch(keys=("c", "d"))) == base  # names and the step's number are not read by the model
    assert layout(batch(length=6)) != base
    assert layout(batch(has_padding=False)) != base  # read on the host: a different recorded graph
    wider = batch()
    wider["image_max_seqlen"] = 128
    assert layout(wider) != base
    retyped = batch()
    retyped["anchors"]["sam"]["targets"]["masks"] = retyped["anchors"]["sam"]["targets"]["masks"].to(torch.uint8)
    assert layout(retyped) != base
    fewer = batch()
    del fewer["anchors"]["sam"]["views"]
    assert layout(fewer) != base


def test_layout_refuses_a_value_that_cannot_key_a_graph():
    odd = batch()
    odd["lengths"] = [[1, 2], {3}]  # a set inside a list: unhashable
    with pytest.raises(TypeError):
        layout(odd)


def test_copy_into_writes_every_tensor_in_place():
    static, fresh = batch(), batch()
    fresh["input_ids"] = fresh["input_ids"] * 10
    fresh["anchors"]["sam"]["targets"]["masks"][:, 0] = True
    tensors = (static["input_ids"], static["anchors"]["sam"]["targets"]["masks"])
    copy_into(static, fresh)
    assert static["input_ids"] is tensors[0] and static["anchors"]["sam"]["targets"]["masks"] is tensors[1]
    assert torch.equal(static["input_ids"], fresh["input_ids"])
    assert bool(static["anchors"]["sam"]["targets"]["masks"][:, 0].all())


def test_graphs_need_a_cuda_device():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        MicroBatchGraphs(lambda b: {}, [param], torch.device("cpu"))


def test_what_train_cuda_graphs_needs_is_said_before_any_work(tmp_path):
    from covt.config import Config, LoraConfig, TrainConfig
    from trainer.step_graphs import cuda_graph_problems
    from trainer.train import train

    cuda = torch.device("cuda")
    fine = Config(anchors=["sam", "depth"], train=TrainConfig(cuda_graphs=True, sam_matching="device"))
    assert cuda_graph_problems(fine, cuda) == []
    wrong = Config(anchors=["sam", "depth"], train=TrainConfig(cuda_graphs=True, packing=True,
                                                               deepspeed="configs/deepspeed/zero2.json"))
    said = " | ".join(cuda_graph_problems(wrong, torch.device("cpu")))
    for needed in ("CUDA device", "train.deepspeed=null", "train.packing=false", "train.sam_matching=device"):
        assert needed in said
    recomputed = Config(anchors=["depth"], train=TrainConfig(cuda_graphs=True, lora=LoraConfig(recompute_dropout=True)))
    assert cuda_graph_problems(recomputed, cuda) == [
        "the adapters' recomputed dropout reads and restores the CUDA random state in the backward pass and has not "
        "run inside a graph: set train.lora.recompute_dropout=false"]
    no_sam = Config(anchors=["depth"], train=TrainConfig(cuda_graphs=True))
    assert cuda_graph_problems(no_sam, cuda) == []  # the scipy matching is the SAM head's only

    cfg = Config(anchors=["depth"], train=TrainConfig(cuda_graphs=True, device="cpu",
                                                      output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="train.cuda_graphs: CUDA graphs need a CUDA device"):
        train(cfg)


def test_graphs_share_one_input_tensor_per_place_and_shape():
    buffers = InputBuffers(torch.device("cpu"))
    first, other_tokens, same = buffers.like(batch()), buffers.like(batch(length=6)), buffers.like(batch())
    masks = ("anchors", "sam", "targets", "masks")

    def at(b, place):
        for key in place:
            b = b[key]
        return b

    assert at(first, masks) is at(other_tokens, masks)  # the same targets' shape: one tensor for both graphs
    assert first["input_ids"] is not other_tokens["input_ids"] and first["input_ids"] is same["input_ids"]
    assert first["input_ids"].shape == (2, 5) and other_tokens["input_ids"].shape == (2, 6)
    assert first["has_padding"] is True and first["keys"] == ["a", "b"]  # values stay as they are
    assert len(buffers.tensors) == 4  # input_ids at two widths, rows, masks


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a CUDA device")


class CachingRun:
    """A micro-batch's forward and backward through a linear layer, with a tensor made on the device the first time
    each width is seen and kept (as the model's per-device caches are): what a later warm-up may leave behind."""

    def __init__(self, device: torch.device):
        self.layer = torch.nn.Linear(8, 8, device=device)
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, batch: dict) -> dict:
        x = batch["x"]
        if x.shape[0] not in self.cache:
            self.cache[x.shape[0]] = torch.full((x.shape[0], 8), 0.5, device=x.device)
        loss = (self.layer(x) * self.cache[x.shape[0]]).square().mean()
        loss.backward()
        return {"loss": loss.detach()}


@cuda_only
def test_replays_add_the_gradients_direct_runs_do_and_survive_a_cache_made_by_a_later_warm_up():
    device = torch.device("cuda")
    torch.manual_seed(0)
    run = CachingRun(device)
    params = list(run.layer.parameters())
    graphs = MicroBatchGraphs(run, params, device)
    batches = [{"x": torch.randn(rows, 8).pin_memory()} for rows in (4, 6, 4, 6, 4)]

    def in_pool(t: torch.Tensor) -> bool:
        return any(seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"]
                   for seg in graphs.pool.snapshot())

    replayed = [float(graphs(b)["loss"]) for b in batches[:1]]
    assert not in_pool(run.cache[4]), "the very first warm-up runs outside the pool"
    graphs(batches[1])  # its warm-ups make the cache of width 6 in the pool where the first graph may keep memory
    assert in_pool(run.cache[6])
    assert len(graphs.graphs) == 1, "the earlier graph is dropped, to be recorded again beside the cache"
    for p in params:
        p.grad.zero_()
    replayed = [float(graphs(b)["loss"]) for b in batches]
    got = [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    direct = [float(run({"x": b["x"].to(device)})["loss"]) for b in batches]
    assert replayed == pytest.approx(direct, rel=1e-6)
    for mine, theirs in zip(got, (p.grad for p in params)):
        torch.testing.assert_close(mine, theirs)
    assert len(graphs.graphs) == 2
    assert graphs.pool_bytes() >= sum(o.numel() * o.element_size() for r in graphs.graphs.values()
                                      for o in r.outputs.values())


@cuda_only
def test_release_gives_the_pool_back_and_the_next_call_records_again():
    device = torch.device("cuda")
    run = CachingRun(device)
    graphs = MicroBatchGraphs(run, list(run.layer.parameters()), device)
    batch = {"x": torch.randn(4, 8).pin_memory()}
    before = float(graphs(batch)["loss"])
    assert graphs.pool_bytes() > 0
    graphs.release()
    assert graphs.graphs == {} and graphs.pool_bytes() == 0
    assert float(graphs(batch)["loss"]) == pytest.approx(before, rel=1e-6)
    assert len(graphs.graphs) == 1 and graphs.pool_bytes() > 0


def test_train_cuda_graphs_advises_padding_to_few_layouts():
    from covt.config import Config, TrainConfig
    from trainer.step_graphs import cuda_graph_advice

    unpadded = cuda_graph_advice(Config(train=TrainConfig(cuda_graphs=True)))
    assert len(unpadded) == 1 and "train.pad_to_multiple_of" in unpadded[0]
    assert cuda_graph_advice(Config(train=TrainConfig(cuda_graphs=True, pad_to_multiple_of=64))) == []
    coarse = cuda_graph_advice(Config(train=TrainConfig(cuda_graphs=True, pad_to_multiple_of=128)))
    assert len(coarse) == 1 and "padding_fraction" in coarse[0]


@cuda_only
def test_running_out_of_memory_while_recording_says_what_to_change():
    device = torch.device("cuda")
    layer = torch.nn.Linear(4, 4, device=device)

    def run(batch: dict) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

    graphs = MicroBatchGraphs(run, list(layer.parameters()), device)
    with pytest.raises(torch.OutOfMemoryError, match="(?s)Tried to allocate.*recording micro-batch CUDA graph 1.*"
                                                      "train.pad_to_multiple_of"):
        graphs({"x": torch.zeros(2, 4).pin_memory()})
