"""GroupedFanInHead as a model component: built from the command line with LabelGrouping, DST and bf16 weights
trained with stochastic rounding; its cluster file; the optimizer group it asks for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cli import base_args, write_dataset

from xmc_dst.clusters import balanced_kmeans_tree, label_embeddings
from xmc_dst.grouped import GroupedFanInLinear, covering_group_size, group_positions
from xmc_dst.heads import GroupedFanInHead, HeadOptimizer


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("grouped_data"))


def grouped_args(data_dir, encoder_dir, tmp, *extra: str) -> list[str]:
    args = base_args(data_dir, encoder_dir, tmp)
    args[args.index("xmc_dst.heads.FixedFanInHead")] = "xmc_dst.heads.GroupedFanInHead"
    return [*args, "--model.head.group_size", "4", *extra]


def test_head_is_the_grouped_layer_with_its_settings(tmp_path):
    head = GroupedFanInHead(8, 10, torch.Generator().manual_seed(2), fan_in=4, group_size=4, optimizer="sgd",
                            lr=0.3, weight_dtype="bfloat16", state_dtype="bfloat16", rounding_seed=5)
    layer = GroupedFanInLinear(8, 10, 4, 4, generator=torch.Generator().manual_seed(2))
    assert head.state_dict().keys() == layer.state_dict().keys()
    assert torch.equal(head.indices, layer.indices)  # same topology; the weights rounded once to bf16
    assert torch.equal(head.weight.detach(), layer.weight.detach().to(torch.bfloat16))
    assert head.optimizer_settings == HeadOptimizer("sgd", 0.3, state_dtype="bfloat16", rounding_seed=5)
    assignment = np.array([1, 0, 1, 0, 2, 2, 1, 0, 0, 1])
    np.save(tmp_path / "clusters.npy", assignment)
    from_file = GroupedFanInHead(8, 10, fan_in=4, group_size=4, cluster_file=str(tmp_path / "clusters.npy"))
    assert torch.equal(from_file.label_position, group_positions(10, 4, torch.from_numpy(assignment)))
    with pytest.raises(ValueError, match="weight_dtype"):
        GroupedFanInHead(12, 10, fan_in=4, weight_dtype="float16")
    with pytest.raises(ValueError, match="state_dtype"):
        GroupedFanInHead(12, 10, fan_in=4, state_dtype="int8")


def test_group_size_is_lowered_until_the_groups_reach_every_input(caplog):
    def brute_force(labels: int, fan_in: int, inputs: int, size: int) -> int:  # groups * fan_in slots >= inputs
        return max([g for g in range(1, size + 1) if labels * fan_in >= g * inputs], default=1)

    for labels, fan_in, inputs, size in [(159, 64, 1024, 32), (159, 64, 1024, 8), (10, 4, 12, 4), (3, 1, 50, 16),
                                         (53_024, 128, 1024, 32), (1, 1, 1, 1)]:
        assert covering_group_size(labels, fan_in, inputs, size) == brute_force(labels, fan_in, inputs, size)
    with caplog.at_level("WARNING"):
        head = GroupedFanInHead(1024, 159, fan_in=64, group_size=32)
    assert head.group_size == 9 and head.num_groups == 18 and "lowered to 9" in caplog.text
    reached = torch.unique(head.indices).numel()
    assert head.num_groups * head.fan_in >= 1024 and reached > 0.6 * 1024  # random rows of 64 of 1,024: most reached
    with pytest.raises(ValueError, match="at least 1"):
        covering_group_size(10, 0, 12, 4)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_cli_trains_grouped_bf16_head_grouped_by_clusters_and_rewired(regrow, tiny_data, tiny_encoder_dir, tmp_path):
    from xmc_dst.cli import cli

    args = grouped_args(tiny_data, tiny_encoder_dir, tmp_path,
                        "--model.head.weight_dtype", "bfloat16", "--model.head.optimizer", "sgd",
                        "--model.head.state_dtype", "bfloat16", "--model.head.lr", "0.5",
                        "--trainer.callbacks+=callbacks.LabelGrouping",
                        "--trainer.callbacks+=callbacks.DynamicSparseTraining",
                        "--trainer.callbacks.interval", "2", "--trainer.callbacks.end", "1.0",
                        "--trainer.callbacks.prune", "fraction", "--trainer.callbacks.seed", "0",
                        "--trainer.callbacks.regrow", regrow,
                        "--trainer.max_steps", "6", "--trainer.limit_val_batches", "1")
    run = cli(["fit", *args])
    model, data = run.model, run.datamodule
    head = model.head
    assert isinstance(head, GroupedFanInHead) and head.weight.dtype == torch.bfloat16
    assert int(head.topology_version) == 2  # rewired at steps 2 and 4
    state = run.trainer.optimizers[0].state[head.weight]
    assert state["momentum_buffer"].dtype == torch.bfloat16 and state["rounding_state"].dtype == torch.uint8
    # the grouping LabelGrouping installed: runs of the balanced clusters built from the training data
    embeddings = label_embeddings(data.train_dataloader, data.num_labels, 128, 0)
    expected = group_positions(data.num_labels, 4, balanced_kmeans_tree(embeddings, head.num_groups, 10, 0))
    assert torch.equal(head.label_position, expected)
    assert not torch.equal(expected, group_positions(data.num_labels, 4))  # differs from label-id order
    rows = head.indices.long()
    assert bool((rows[:, 1:] > rows[:, :-1]).all())  # unique sorted rows after rewiring
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
