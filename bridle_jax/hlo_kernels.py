"""The kernels of an optimised HLO module, counted by kind with the bytes they move.

Each instruction of the entry computation that runs as a kernel (a fusion, a library or
custom call, a copy, a collective, ...) is put in one of `KINDS`; instructions inside a
while loop (a `grad_accum` loop) count once per trip where XLA knows the trip count.
A kernel's bytes are its operands' sizes plus its results': the traffic to and from
device memory if every operand is read once, an upper bound for kernels that touch a
slice of a buffer (in-place updates).
"""
import collections
import re

KINDS = ("matmul", "attention", "pallas kernel", "fusion", "copy", "collective",
         "host transfer", "other")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]+[a-z0-9]*|pred)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.*?) "
                          r"(?P<op>[a-z][\w\-]*)\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_HEADER = re.compile(r"^(ENTRY )?%(?P<name>[\w.\-]+) .*\{$")
_CALLS = re.compile(r"\b(?:calls|body|to_apply)=%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')

_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all", "all-reduce-start", "all-gather-start",
                "collective-permute-start", "ragged-all-to-all", "collective-broadcast"}
_HOST = {"send", "recv", "infeed", "outfeed"}
_DONE = {"all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
         "async-update", "send-done", "recv-done", "copy-done"}
_MATMULS = {"dot", "convolution"}


def shape_bytes(type_text: str) -> int:
  """Bytes of the array shapes in an HLO type (a tuple's elements summed)."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    total += count * _BYTES.get(dtype, 0)
  return total


def _computations(hlo_text: str) -> tuple[dict[str, list[dict]], str]:
  """{computation name: its instructions as dicts}, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header["name"], [])
      entry = header["name"] if header.group(1) else entry
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      current.append(instruction.groupdict())
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _kind(instruction: dict, computations: dict, has_matmul) -> str | None:
  """The kind of kernel an instruction runs as, None for those that run none."""
  op, attrs = instruction["op"], instruction["attrs"]
  if op in _FREE or op in _DONE:
    return None
  if op in _COLLECTIVES:
    return "collective"
  if op in _HOST:
    return "host transfer"
  called = _CALLS.findall(attrs)
  if op == "async-start":
    inner = {i["op"] for c in called for i in computations.get(c, [])}
    return "collective" if inner & _COLLECTIVES else "host transfer" if inner & _HOST else "other"
  if op == "custom-call":
    target = (_TARGET.search(attrs) or [None, ""])[1].lower()
    if "cudnn$fmha" in target:
      return "attention"
    if "triton" in target or "tpu_custom_call" in target or "mosaic" in target:
      return "pallas kernel"
    if "cublas" in target or "gemm" in target or "matmul" in target:
      return "matmul"
    return "host transfer" if "callback" in target else "other"
  if op in _MATMULS or (op == "fusion" and any(has_matmul(c) for c in called)):
    return "matmul"
  if op == "fusion":
    return "fusion"
  if op in ("copy", "copy-start"):
    return "host transfer" if "S(5)" in instruction["type"] else "copy"
  return "other"


def kernel_table(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{kind: (kernels per step, bytes they move per step)} of an optimised HLO module."""
  computations, entry = _computations(hlo_text)
  memo: dict[str, bool] = {}

  def has_matmul(name: str) -> bool:
    if name not in memo:
      memo[name] = False  # guards against cycles
      memo[name] = any(i["op"] in _MATMULS or any(has_matmul(c) for c in _CALLS.findall(i["attrs"]))
                       for i in computations.get(name, []))
    return memo[name]

  table = collections.defaultdict(lambda: [0, 0])

  def count(name: str, trips: int) -> None:
    sizes = {}
    for instruction in computations[name]:
      sizes[instruction["name"]] = shape_bytes(instruction["type"])
      if instruction["op"] == "while":
        body = re.search(r"\bbody=%([\w.\-]+)", instruction["attrs"])[1]
        trip_count = _TRIP_COUNT.search(instruction["attrs"])
        count(body, trips * (int(trip_count[1]) if trip_count else 1))
        continue
      kind = _kind(instruction, computations, has_matmul)
      if kind is None:
        continue
      operands = re.findall(r"%([\w.\-]+)", instruction["operands"])
      moved = sizes[instruction["name"]] + sum(sizes.get(o, 0) for o in operands)
      table[kind][0] += trips
      table[kind][1] += trips * moved

  count(entry, 1)
  return {kind: tuple(table[kind]) for kind in KINDS if kind in table}
