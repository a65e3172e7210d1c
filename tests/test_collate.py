"""PreferenceBatch: what PreferenceCollator emits, and that Lightning's batch transfer keeps it."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from safealign.data.collate import IGNORE, Encoded, PreferenceCollator
from safealign.types import PreferenceBatch, Rows


def _enc(prompt: list[int], response: list[int]) -> Encoded:
    return Encoded(prompt + response, [IGNORE] * len(prompt) + response, False)


def _items(toxic: bool) -> list[tuple[int, dict[str, Encoded]]]:
    items = []
    for i in (7, 3):
        enc = {"chosen": _enc([1, 2], [10 + i]), "rejected": _enc([1, 2], [20, 21, i])}
        if toxic:
            enc["toxic"] = _enc([1, 2], [30])
            enc["toxic_ctx"] = _enc([1, 2, 99], [30])
        items.append((i, enc))
    return items


def test_two_way_batch():
    batch = PreferenceCollator(pad_id=0)(_items(toxic=False))
    assert isinstance(batch, PreferenceBatch) and batch.n_way == 2 and batch.toxic_ctx is None
    assert batch.index.tolist() == [7, 3]
    assert batch.input_ids.tolist() == [[1, 2, 17, 0, 0], [1, 2, 13, 0, 0],
                                        [1, 2, 20, 21, 7], [1, 2, 20, 21, 3]]  # fmt: skip
    assert batch.attention_mask.sum(-1).tolist() == [3, 3, 5, 5]
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, 17, IGNORE, IGNORE]


def test_three_way_batch_and_chosen_rejected():
    batch = PreferenceCollator(pad_id=0)(_items(toxic=True))
    assert batch.n_way == 3 and batch.input_ids.shape == (6, 5)
    pairs = batch.chosen_rejected()
    assert isinstance(pairs, Rows)
    for got, full in zip(pairs, (batch.input_ids, batch.attention_mask, batch.labels), strict=True):
        assert torch.equal(got, full[:4])
    assert batch.toxic_ctx.input_ids.tolist() == [[1, 2, 99, 30]] * 2
    assert batch.token_count() == 3 + 3 + 5 + 5 + 3 + 3 + 4 + 4


def test_lightning_batch_transfer_moves_every_tensor():
    """Lightning moves batches with apply_to_collection: a NamedTuple (nested ones and a None
    field too) comes back as the same type, every tensor on the target device."""
    batch = PreferenceCollator(pad_id=0)(_items(toxic=True))
    device = torch.device("meta")  # a device other than the CPU that needs no hardware
    moved = move_data_to_device(batch, device)
    assert type(moved) is PreferenceBatch and type(moved.toxic_ctx) is Rows
    assert all(t.device == device for t in (*moved[:4], *moved.toxic_ctx))
    two_way = move_data_to_device(PreferenceCollator(pad_id=0)(_items(toxic=False)), device)
    assert two_way.toxic_ctx is None and two_way.input_ids.device == device
