"""Device-side compaction shared by the kernels that skip work on some tokens (no host sync)."""
from __future__ import annotations

import torch


def selected_first_order(selected: torch.Tensor):
    """For a flat bool tensor: a permutation (int32) listing the selected positions first, then the
    others, each group in index order, and the selected count as a device tensor of shape (1,).
    Kernels launch for the worst case and read the count, so no .item() is needed. The count is a view at
    byte offset 4 * (n - 1), whose 16-byte alignment changes with n (the batch size): kernels take its
    pointer with ``do_not_specialize_on_alignment``, so a new batch size compiles nothing new."""
    index = torch.arange(selected.numel(), device=selected.device, dtype=torch.int32)
    selected_rank = torch.cumsum(selected, 0, dtype=torch.int32)  # selected up to and including this one
    num_selected = selected_rank[-1:]
    position = torch.where(selected, selected_rank - 1, num_selected + index - selected_rank)
    order = torch.empty_like(index).scatter_(0, position.long(), index)
    return order, num_selected
