"""Per-partition tables from activation rows to adapter slots, refilled in place before each forward.

A partition's activations are shared by the batch's requests in order, each request owning rows
in proportion to its weight (see `mmlora_fx.kernels.reference`): the language model weighs every
request 1, the tower and the connector weigh a request by its image tokens. So one table, two
small device tensors with fixed addresses, serves every layer of a partition whatever number of
rows that layer sees (Qwen2-VL's tower sees four rows per image token, its merger one), and CUDA
graphs replay them while their contents change. A third, the tile plan, carries the kernels'
grouping of rows by adapter for one row per unit of weight (decode), worked out here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import BatchError
from .kernels.tile_plan import build_tile_plan

__all__ = ["TokenSlotTable"]


class TokenSlotTable:
    def __init__(self, partition: str, max_batch_size: int, device: torch.device):
        self.partition = partition
        self.max_batch_size = max_batch_size
        self.request_slots = torch.full((max_batch_size,), -1, dtype=torch.int32, device=device)
        self.request_cum_weights = torch.zeros(max_batch_size + 1, dtype=torch.int64, device=device)
        # The kernels' grouping of rows by slot for one row per unit of weight (decode), written
        # here once per forward instead of searched for by every kernel program of every layer.
        self.tile_plan = build_tile_plan([], [0]).to(device)
        # Host copies of the slots and running weights, to check row splits without reading the device.
        self.slots: list[int] = []
        self.cum_weights: list[int] = [0]
        self._written = True  # whether the device tables hold `slots` and `cum_weights`

    def fill(self, slots: Sequence[int], weights: Sequence[int]) -> None:
        """Set each request's slot (-1: base model) and weight, in batch order."""
        if len(slots) != len(weights):
            raise ValueError("one weight per request")
        if len(slots) > self.max_batch_size:
            raise BatchError(f"the batch has {len(slots)} requests but max_batch_size is {self.max_batch_size}")
        cum = [0]
        for weight in weights:
            cum.append(cum[-1] + int(weight))
        slots = [int(slot) for slot in slots]
        if self._written and slots == self.slots and cum == self.cum_weights:
            # The same batch as the last fill (decode steps of an unchanged batch): the device
            # tables already hold it; no host-to-device copies, no tile plan.
            return
        padded_slots = slots + [-1] * (self.max_batch_size - len(slots))
        padded_cum = cum + [cum[-1]] * (self.max_batch_size - len(slots))
        # From pageable memory the copy returns once the host data is staged: no race, no sync.
        self.request_slots.copy_(torch.tensor(padded_slots, dtype=torch.int32), non_blocking=True)
        self.request_cum_weights.copy_(torch.tensor(padded_cum, dtype=torch.int64), non_blocking=True)
        self.tile_plan.copy_(build_tile_plan(slots, cum), non_blocking=True)
        self.slots = slots
        self.cum_weights = cum
        self._written = True

    def forget(self) -> None:
        """Make the next fill write the device tables whatever it holds (benchmarks that repeat a
        batch but must pay what a new batch pays)."""
        self._written = False

    def check_rows(self, rows: int, leading: int = 1, why: str = "") -> None:
        """Refuse an activation whose rows cannot be shared among requests by their weights.

        `leading`: the rows come as `[leading, rows // leading]` blocks (one per image or crop, say);
        a share that cuts a block would give one block two adapters, so it is refused too. `why`
        ends the message: why the rows could not be owned another way.
        """
        total = self.cum_weights[-1]
        if total == 0:
            if rows and any(slot >= 0 for slot in self.slots):
                # Rows nobody owns would silently run the base model for requests that asked for
                # an adapter (an audio tower weighed by image tokens, say): refuse instead.
                raise BatchError(
                    f"a {self.partition} layer saw {rows} rows, but no request of the batch owns any {self.partition} "
                    "row (requests are weighed by their image tokens, and this batch has none): mmlora_fx cannot tell "
                    "which request these rows belong to (a tower named for a modality its rows are not of, by "
                    "partition_overrides?); "
                    "leave this partition out with partitions=[...]"
                )
            return
        uneven = [index for index, cum in enumerate(self.cum_weights) if (cum * rows) % total]
        if uneven:
            raise BatchError(
                f"a {self.partition} layer saw {rows} rows, which do not split among the batch's requests in "
                f"proportion to their weights {self._weights()} (request {uneven[0] - 1} would own a fraction "
                "of a row): mmlora_fx could not trace this family's tower units to their requests" + why
            )
        if leading > 1:
            cut = [index for index, cum in enumerate(self.cum_weights) if (cum * leading) % total]
            if cut:
                raise BatchError(
                    f"a {self.partition} layer saw its rows as {leading} blocks of {rows // leading} (one per image, "
                    f"crop or tile?), but sharing them by the requests' weights {self._weights()} cuts a block "
                    f"(request {cut[0] - 1} would own part of one): its rows do not follow the image tokens, and "
                    "mmlora_fx could not trace this family's tower units to their requests" + why
                )

    def _weights(self) -> list[int]:
        return [b - a for a, b in zip(self.cum_weights, self.cum_weights[1:])]
