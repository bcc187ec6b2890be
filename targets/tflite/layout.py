"""Layout algebra of the ONNX -> TFLite translation: where each tensor's dimensions lie in memory.

The ONNX graph is NCHW; the TFLite graph keeps 4-D activations NHWC. Rather than wrapping every op in
transposes, each translated tensor carries a permutation ``perm``: its TFLite (physical) array is the
ONNX (logical) array transposed by ``perm`` (``physical = logical.transpose(perm)``). NHWC of an NCHW
tensor is ``(0, 2, 3, 1)``. Element-wise ops keep the perm, an ONNX Transpose only changes it (no op is
written), and a Reshape finds a perm under which it is a plain TFLite RESHAPE (:func:`reshape_perm`).
A TRANSPOSE is written only where an op needs another layout than the one its input has.
"""

from __future__ import annotations

from collections.abc import Sequence

Perm = tuple[int, ...]
NHWC: Perm = (0, 2, 3, 1)


def identity(rank: int) -> Perm:
    return tuple(range(rank))


def inverse(perm: Sequence[int]) -> Perm:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def physical_shape(shape: Sequence[int], perm: Sequence[int]) -> list[int]:
    """The TFLite shape of a tensor of ONNX ``shape`` stored under ``perm``."""
    return [int(shape[p]) for p in perm]


def after_transpose(perm: Sequence[int], onnx_perm: Sequence[int]) -> Perm:
    """The perm of ``Transpose(x, onnx_perm)`` when its output keeps x's buffer unchanged."""
    inv = inverse(onnx_perm)
    return tuple(inv[p] for p in perm)


def transpose_between(shape: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> Perm:
    """The TFLite TRANSPOSE perm that turns a tensor stored under ``src`` into one stored under ``dst``."""
    inv = inverse(src)
    return tuple(inv[d] for d in dst)


def moves_only_unit_dims(shape: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> bool:
    """True when going from ``src`` to ``dst`` keeps the order of every dimension larger than 1, so a
    RESHAPE does what a TRANSPOSE would."""
    a = [p for p in src if shape[p] != 1]
    b = [p for p in dst if shape[p] != 1]
    return a == b


def expand_perm(perm: Sequence[int], rank: int) -> Perm:
    """The perm of a tensor broadcast up to ``rank`` by prepending unit dims (ONNX broadcasting)."""
    k = rank - len(perm)
    return tuple(range(k)) + tuple(p + k for p in perm)


def _atoms(a: Sequence[int], b: Sequence[int]) -> tuple[list[list[int]], list[list[int]]] | None:
    """Split two shapes of equal element count (without unit dims) into their common refinement:
    for each dim of ``a`` and ``b`` the list of atom ids it is made of. None if the shapes do not share
    a refinement (a dim of one straddles two dims of the other without dividing evenly)."""
    ia = ib = 0
    ra = a[0] if a else 1
    rb = b[0] if b else 1
    atoms_a: list[list[int]] = [[] for _ in a]
    atoms_b: list[list[int]] = [[] for _ in b]
    atom = 0
    while ia < len(a) and ib < len(b):
        size = min(ra, rb)
        if ra % size or rb % size:
            return None
        atoms_a[ia].append(atom)
        atoms_b[ib].append(atom)
        atom += 1
        ra //= size
        rb //= size
        if ra == 1:
            ia += 1
            ra = a[ia] if ia < len(a) else 1
        if rb == 1:
            ib += 1
            rb = b[ib] if ib < len(b) else 1
    if ia != len(a) or ib != len(b):
        return None
    return atoms_a, atoms_b


def reshape_perm(in_shape: Sequence[int], in_perm: Sequence[int], out_shape: Sequence[int]) -> Perm | None:
    """A perm for ``Reshape(x, out_shape)`` (``x`` stored under ``in_perm``) such that a TFLite RESHAPE of
    x's buffer gives the output stored under it; None when no such perm exists (then x must first be
    transposed to its ONNX layout).

    Example: NCHW ``[1, 32, 8, 8]`` stored NHWC, reshaped to ``[1, 4, 8, 64]`` (GroupNorm's groups):
    the groups follow H and W in memory, so the result is stored as ``[1, 64, 4, 8]`` (perm ``(0, 3, 1, 2)``).
    """
    big_in = [d for d in range(len(in_shape)) if in_shape[d] != 1]
    big_out = [d for d in range(len(out_shape)) if out_shape[d] != 1]
    split = _atoms([in_shape[d] for d in big_in], [out_shape[d] for d in big_out])
    if split is None:
        return None
    atoms_in, atoms_out = split
    # Atoms in memory order: the input's big dims in physical order, each dim's atoms in order.
    pos_in = {d: i for i, d in enumerate(big_in)}
    memory = [a for d in in_perm if in_shape[d] != 1 for a in atoms_in[pos_in[d]]]
    where = {a: i for i, a in enumerate(memory)}
    order: list[int] = []
    for j, d in enumerate(big_out):
        first = where[atoms_out[j][0]]
        if [where[a] for a in atoms_out[j]] != list(range(first, first + len(atoms_out[j]))):
            return None  # this output dim's atoms are not contiguous (in order) in memory
        order.append(d)
    order.sort(key=lambda d: where[atoms_out[big_out.index(d)][0]])
    # Unit dims go right after the nearest preceding (in ONNX order) dim already placed.
    result = list(order)
    for d in range(len(out_shape)):
        if out_shape[d] != 1:
            continue
        before = [i for i, e in enumerate(result) if e < d]
        result.insert(before[-1] + 1 if before else 0, d)
    return tuple(result)
