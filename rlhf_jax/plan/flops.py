"""The matrix-multiply FLOPs a compiled program runs, read from its optimised HLO with every
loop body counted as many times as the loop runs.

XLA's ``cost_analysis()`` charges a ``while`` loop's body once, so a decoder whose layers are a
``scan`` is undercounted by the number of layers (and a step's micro-batch loop by the number
of micro-batches). XLA:CPU annotates a loop whose trip count it can prove
(``known_trip_count`` in the ``while``'s backend config: every ``scan``); a TPU program carries
no such note, so there a loop of the ``scan`` form -- a condition ``i < N`` on a counter that
starts at a constant and that the body advances by a constant -- counts
``ceil((N - start) / step)`` times. This module walks the program from its entry computation,
multiplies each loop body by its count and adds the matrix multiplies: a ``dot`` costs
2 x (output elements) x (contracted elements), a ``convolution`` (as the TPU compiler writes
matrix products) 2 x (output elements) x (input features) x (the window positions that fall
on the input, not its padding). Elementwise work, reductions and a custom kernel's own FLOPs
(a Pallas call: splash attention) are not counted, but the kernels are (``custom_kernels``); a
loop without a known trip count (a ``while_loop`` that stops on a condition, as the
sampler's decode loop) is counted once and reported, so the total is then a lower bound. CPU
and TPU programs only: on a GPU the matrix products are cuBLAS calls this count does not see."""

from __future__ import annotations

import dataclasses
import math
import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_PARAMETER = re.compile(r"([\w.\-]+): ([a-z]\w*\[[\d,]*\])")


@dataclasses.dataclass(frozen=True)
class MatmulFlops:
    """``flops``: the program's matrix-multiply FLOPs per device; ``uncounted_loops``: loops
    whose trip count the compiler did not know, each counted once (``flops`` a lower bound);
    ``custom_kernels``: the custom kernels (Pallas calls) whose FLOPs are not in ``flops``."""

    flops: float
    uncounted_loops: int = 0
    custom_kernels: int = 0


def _dims(array_type: str) -> tuple[int, ...] | None:
    found = _ARRAY.match(array_type)
    if found is None:  # a tuple or a token
        return None
    return tuple(int(d) for d in found.group(1).split(",") if d)


def _attribute(rest: str, name: str) -> str | None:
    found = re.search(rf"\b{name}=(\{{[^}}]*\}}|[^,\s]+)", rest)
    return None if found is None else found.group(1)


def _numbers(value: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", value or "")]


def _operands(rest: str) -> list[str]:
    depth, operands, current = 0, [], ""
    for char in re.sub(r"/\*.*?\*/", "", rest):
        if char in "([{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        if char == "," and depth == 0:
            operands.append(current)
            current = ""
        else:
            current += char
    operands.append(current)
    return [o.strip().split()[-1].lstrip("%") for o in operands if o.strip()]


def _own_flops(opcode: str, result: str, rest: str, shapes: dict[str, tuple[int, ...]]) -> float:
    """The FLOPs of one ``dot`` or ``convolution`` instruction (0 for any other)."""
    if opcode not in ("dot", "convolution"):
        return 0.0
    output, operands = _dims(result), _operands(rest)
    if output is None or len(operands) < 2:
        return 0.0
    if opcode == "dot":
        lhs = shapes.get(operands[0])
        if lhs is None:
            return 0.0
        contracted = math.prod(lhs[d] for d in _numbers(_attribute(rest, "lhs_contracting_dims")))
        return 2.0 * math.prod(output) * contracted
    lhs, kernel, labels = shapes.get(operands[0]), shapes.get(operands[1]), _attribute(rest, "dim_labels")
    if lhs is None or kernel is None or labels is None:
        return 0.0
    return 2.0 * _convolution_macs(lhs, kernel, output, labels, _window(rest))


def _window(rest: str) -> dict[str, list[list[int]]]:
    """A convolution's ``window={size=1x32 pad=0_0x31_31 ...}``: each field per spatial dimension."""
    found = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(part.split("=", 1) for part in found.group(1).split()) if found else {}
    return {name: [[int(n) for n in re.findall(r"-?\d+", v)] for v in value.split("x")] for name, value in fields.items()}


def _convolution_macs(lhs, kernel, output, labels: str, window: dict) -> float:
    """Multiply-adds of a convolution: per output batch row and feature, the kernel's input
    features times, per spatial dimension, the (output position, window position) pairs that
    land on the input rather than its padding -- XLA writes a batched matrix product as a
    convolution whose padded window slides over a dimension of size 1 (a head axis), and
    charging the whole window would count the padding's zeros."""
    inputs, rest = labels.split("_", 1)
    kernel_labels, output_labels = rest.split("->")
    macs = output[output_labels.index("b")] * output[output_labels.index("f")] * kernel[kernel_labels.index("i")]
    for d in range(sum(c.isdigit() for c in inputs)):
        size, out = lhs[inputs.index(str(d))], output[output_labels.index(str(d))]
        taps = kernel[kernel_labels.index(str(d))]

        def field(name, default):
            return window.get(name, [[default, default]] * (d + 1))[d]

        low = field("pad", 0)[0]
        stride, lhs_dilation, rhs_dilation = field("stride", 1)[0], field("lhs_dilate", 1)[0], field("rhs_dilate", 1)[0]
        dilated = (size - 1) * lhs_dilation + 1
        macs *= sum(1 for o in range(out) for w in range(taps)
                    if 0 <= (i := o * stride + w * rhs_dilation - low) < dilated and i % lhs_dilation == 0)
    return float(macs)


def _constant(instruction, named: dict) -> int | None:
    """The integer an instruction holds when it is a constant or a copy of one."""
    instruction = _uncopied(instruction, named)
    if instruction is None or instruction[2] != "constant":
        return None
    found = re.match(r"\s*(-?\d+)\)", instruction[3])
    return None if found is None else int(found.group(1))


def _uncopied(instruction, named: dict):
    while instruction is not None and instruction[2] == "copy":
        instruction = named.get(_operands(instruction[3])[0])
    return instruction


def _through_fusion(instruction, named: dict, computations: dict, roots: dict):
    """``(operation, [(operand, the instructions it is among), ...])`` of ``instruction``, or,
    when it is a fusion (as XLA:CPU wraps a compare or an add), of the fusion's root with its
    parameters standing for the fusion's operands; ``(None, [])`` when there is no root."""
    outer = [(named.get(o), named) for o in _operands(instruction[3])]
    if instruction[2] != "fusion":
        return instruction, outer
    callee = (_attribute(instruction[3], "calls") or "").lstrip("%")
    inner = {i[0]: i for i in computations.get(callee, [])}
    root = inner.get(roots.get(callee))
    if root is None:
        return None, []
    operands = []
    for name in _operands(root[3]):
        found = inner.get(name)
        position = _numbers(found[3].split(")")[0]) if found is not None and found[2] == "parameter" else []
        operands.append(outer[position[0]] if position and position[0] < len(outer) else (found, inner))
    return root, operands


def _counter_index(instruction, named: dict) -> int | None:
    """``i`` when ``instruction`` is ``get-tuple-element(parameter), index=i`` (a loop's counter)."""
    instruction = _uncopied(instruction, named)
    if instruction is None or instruction[2] != "get-tuple-element":
        return None
    source = named.get(_operands(instruction[3])[0])
    index = _numbers(_attribute(instruction[3], "index"))
    return index[0] if index and source is not None and source[2] == "parameter" else None


def _trip_count(rest: str, caller: dict, computations: dict, roots: dict) -> int | None:
    """The number of times a ``while`` (``rest``: its text after the opcode, in ``caller``)
    runs: the compiler's ``known_trip_count``, else ``ceil((N - start) / step)`` for a
    condition ``i < N`` on a counter the caller initialises to the constant ``start`` and the
    body advances by the constant ``step`` (a scan's loop, unrolled or not), else None."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known is not None:
        return int(known.group(1))
    condition, body = ((_attribute(rest, name) or "").lstrip("%") for name in ("condition", "body"))
    named = {i[0]: i for i in computations.get(condition, [])}
    root = named.get(roots.get(condition))
    compare, operands = (None, []) if root is None else _through_fusion(root, named, computations, roots)
    if compare is None or compare[2] != "compare" or "direction=LT" not in compare[3] or len(operands) != 2:
        return None
    (counter, counter_named), (bound, bound_named) = operands
    index, limit = _counter_index(counter, counter_named), _constant(bound, bound_named)
    state = caller.get(_operands(rest)[0])
    if index is None or limit is None or state is None or state[2] != "tuple":
        return None
    start = _constant(caller.get(_operands(state[3])[index]), caller)
    body_named = {i[0]: i for i in computations.get(body, [])}
    result = body_named.get(roots.get(body))
    if start is None or result is None or result[2] != "tuple":
        return None
    advance = _uncopied(body_named.get(_operands(result[3])[index]), body_named)
    add, terms = (None, []) if advance is None else _through_fusion(advance, body_named, computations, roots)
    if add is None or add[2] != "add" or len(terms) != 2:
        return None
    for (term, term_named), (other, other_named) in (terms, terms[::-1]):
        step = _constant(other, other_named)
        if _counter_index(term, term_named) == index and step is not None and step > 0:
            return max(-(-(limit - start) // step), 0)
    return None


def matmul_flops(hlo_text: str) -> MatmulFlops:
    """The matrix-multiply FLOPs of the compiled module ``hlo_text`` (``compiled.as_text()``),
    per device for an SPMD program, loops counted by their known trip counts. Raises
    ``ValueError`` for a text with no entry computation."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    roots: dict[str, str] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None:
            current = header.group(1)
            computations[current], shapes[current] = [], {}
            for name, array_type in _PARAMETER.findall(header.group(2)):
                if (dims := _dims(array_type)) is not None:
                    shapes[current][name] = dims
            entry = current if line.startswith("ENTRY") else entry
            continue
        found = _INSTRUCTION.match(line) if current is not None else None
        if found is not None:
            name, result, opcode, rest = found.groups()
            computations[current].append((name, result, opcode, rest))
            if line.lstrip().startswith("ROOT "):
                roots[current] = name
            if (dims := _dims(result)) is not None:
                shapes[current][name] = dims
    if entry is None:
        raise ValueError("matmul_flops: the HLO text has no ENTRY computation")
    memo: dict[str, tuple[float, int]] = {}
    kernels = sum(1 for instructions in computations.values() for _, _, opcode, rest in instructions
                  if opcode == "custom-call" and re.search(r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton)"', rest))

    def total(computation: str) -> tuple[float, int]:
        if computation in memo:
            return memo[computation]
        flops, unknown = 0.0, 0
        instructions = {i[0]: i for i in computations.get(computation, [])}
        for _, result, opcode, rest in computations.get(computation, []):
            flops += _own_flops(opcode, result, rest, shapes[computation])
            if opcode == "while":
                trips = _trip_count(rest, instructions, computations, roots)
                body_flops, body_unknown = total(_attribute(rest, "body").lstrip("%"))
                flops += body_flops * (1 if trips is None else trips)
                unknown += body_unknown + (trips is None)
            elif opcode == "conditional":
                branches = _attribute(rest, "branch_computations") or ",".join(
                    filter(None, (_attribute(rest, "true_computation"), _attribute(rest, "false_computation"))))
                costs = [total(b.strip(" %{}")) for b in branches.split(",") if b.strip(" %{}")]
                if costs:
                    flops, unknown = flops + max(c[0] for c in costs), unknown + max(c[1] for c in costs)
            elif not opcode.endswith(("-done", "-update")):  # an async op's computation: once, at its start
                called = _attribute(rest, "calls") or (_attribute(rest, "to_apply") if opcode == "call" else None)
                for callee in ([] if called is None else called.strip("{}").split(",")):
                    callee_flops, callee_unknown = total(callee.strip(" %"))
                    flops, unknown = flops + callee_flops, unknown + callee_unknown
        memo[computation] = flops, unknown
        return memo[computation]

    flops, unknown = total(entry)
    return MatmulFlops(flops, unknown, kernels)


def model_flops(body_parameters: int, head_parameters: int, layers: int, heads: int, head_dim: int, tokens: int,
                length: int, *, passes: int, head_tokens: int | None = None) -> tuple[float, float]:
    """``(all, attention)``: the FLOPs a model's matrix multiplies need for ``tokens`` tokens of
    sequences of ``length``, ``passes`` passes (a forward is 1, a backward 2: training is 3), as
    PaLM counts them (Chowdhery et al., 2022, appendix B): per token and pass 2 N for the
    weights and 4 L H D S for attention's scores and values (``L`` layers, ``H`` query heads of
    ``D`` dimensions over ``S = length`` keys) -- the second number, apart for a program whose
    attention is a custom kernel. ``N`` is the decoder's weights that multiply activations
    (``body_parameters``) and the output head's (``head_parameters``), the head's over
    ``head_tokens`` only (default all: a policy's log-probs read only its completions)."""
    head_tokens = tokens if head_tokens is None else head_tokens
    attention = float(passes) * tokens * 4.0 * layers * heads * head_dim * length
    weights = float(passes) * 2.0 * (tokens * body_parameters + head_tokens * head_parameters)
    return weights + attention, attention
