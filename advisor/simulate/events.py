"""The allocation sequence of a deep model from three shallow ones, exactly or not at all.

The allocator replay (advisor/allocator.py) needs the whole sequence of allocations and frees of a run: its
reserve is not linear in depth (which blocks a new segment reuses changes with the layer count), so it cannot
be extrapolated like the live bytes. But a model of N identical layers allocates the same things per layer,
so its sequence is that of a shallower one with each layer's stretch of events repeated: embedding, N
forward layers, the head and loss, N backward layers, the optimizer over N layers' tensors, zero_grad.

Encoding (:func:`encode`): an allocation is its size and its final tag (weights, gradients, optimizer states,
...); a free is the size and tag of what it frees, and that allocation's rank among the live ones of its size
and tag, counted from the newest and from the oldest. :func:`extrapolate` finds where depth a+1 inserts
stretches of events into depth a (sizes and tags only), checks that inserting them twice gives depth a+2 token
for token, and learns for every free where it occurs (its site: a position of depth a, or an offset in an
inserted stretch, whichever copy) which rank it frees: one that is the same at every occurrence at the three
depths, from the newest (a layer's backward frees what its own forward saved, with as many same-size tensors
made since) or from the oldest (a loop over all layers' adapters frees the oldest first). It then inserts the
stretches (target - a) times. A sequence that does not pass the checks is not extrapolated (the caller
simulates every layer). :func:`decode` turns the tokens back into events for the replay; decode(encode(events))
is the same sequence up to the names of the allocations.
"""

from __future__ import annotations

from collections.abc import Sequence

Token = tuple
WINDOW = 8  # tokens that must match after an inserted stretch before it is accepted (the check decides)


def encode(events: Sequence[tuple[str, object, int]], tags: dict[object, str | None]) -> list[Token]:
    """Events ("alloc", key, nbytes) / ("free", key, 0) / ("mark", name, 0) as tokens; ``tags``: key -> tag.
    An allocation is ("a", size, tag); a free ("f", size, tag, newest, oldest): the freed allocation's rank
    among the live ones of its size and tag, counted from the newest and from the oldest."""
    live: dict[tuple, list] = {}
    kind_of: dict[object, tuple] = {}
    out: list[Token] = []
    for op, key, n in events:
        if op == "alloc":
            k = (n, tags.get(key))
            live.setdefault(k, []).append(key)
            kind_of[key] = k
            out.append(("a", *k))
        elif op == "free":
            k = kind_of.pop(key)
            same = live[k]
            i = len(same) - 1 - same[::-1].index(key)  # searched from the newest: recent frees are found at once
            out.append(("f", *k, len(same) - 1 - i, i))
            del same[i]
        else:
            out.append(("m", key))
    return out


def _plain(tokens: Sequence[Token]) -> list[Token]:
    """The tokens without the frees' ranks (what the alignment compares)."""
    return [t[:3] if t[0] == "f" else t for t in tokens]


def decode(tokens: Sequence[Token], rules: Sequence[tuple[str, int] | None] | None = None) -> list[tuple]:
    """Tokens back to events with fresh integer keys. A free takes its rank from ``rules`` (per token: ("new", r)
    or ("old", r)) where given, else its own newest rank."""
    live: dict[tuple, list[int]] = {}
    out: list[tuple[str, object, int]] = []
    nxt = 0
    for idx, tok in enumerate(tokens):
        if tok[0] == "a":
            k = (tok[1], tok[2])
            live.setdefault(k, []).append(nxt)
            out.append(("alloc", nxt, tok[1]))
            nxt += 1
        elif tok[0] == "f":
            same = live[(tok[1], tok[2])]
            rule = rules[idx] if rules is not None else None
            end, r = rule if rule is not None else ("new", tok[3])
            out.append(("free", same.pop(len(same) - 1 - r if end == "new" else r), 0))
        else:
            out.append(("mark", tok[1], 0))
    return out


def insertions(short: Sequence[Token], long: Sequence[Token]) -> list[tuple[int, list[Token]]] | None:
    """Where ``long`` inserts stretches of tokens into ``short``: [(position in short, stretch)], in order; None
    when ``long`` is not ``short`` with insertions. At a mismatch the shortest stretch after which the next
    WINDOW tokens (or all that are left) match again is taken; a wrong choice fails the caller's check."""
    i = j = 0
    out: list[tuple[int, list[Token]]] = []
    ns, nl = len(short), len(long)
    while i < ns:
        if j < nl and short[i] == long[j]:
            i += 1
            j += 1
            continue
        w = min(WINDOW, ns - i)
        want = short[i:i + w]
        most = (nl - j) - (ns - i)  # what is left to insert
        for size in range(1, most + 1):
            if long[j + size] == want[0] and long[j + size:j + size + w] == want:
                out.append((i, list(long[j:j + size])))
                j += size
                break
        else:
            return None
    if j < nl:
        out.append((ns, list(long[j:])))
    return out


def _insert(short: Sequence, ins: list[tuple[int, list]], times: int) -> list:
    out: list = []
    prev = 0
    for pos, stretch in ins:
        out.extend(short[prev:pos])
        for _ in range(times):
            out.extend(stretch)
        prev = pos
    out.extend(short[prev:])
    return out


def _sites(n_short: int, ins: list[tuple[int, list]], times: int) -> list[tuple]:
    """Each token's site in the sequence with ``times`` copies of every stretch: ("o", position in the short
    sequence) or ("s", stretch, offset), the same for every copy of a stretch."""
    short = [("o", p) for p in range(n_short)]
    stretches = [(pos, [("s", k, o) for o in range(len(st))]) for k, (pos, st) in enumerate(ins)]
    return _insert(short, stretches, times)


def extrapolate(runs: dict[int, list[Token]], target: int) -> tuple[list[Token], list] | None:
    """(tokens, rules) of depth ``target`` for :func:`decode`, from the tokens of three consecutive depths a, a+1,
    a+2; None unless inserting what a+1 adds to a twice gives a+2 exactly, and every free frees the same
    rank (from the newest or from the oldest of its kind) wherever its site occurs at the three depths."""
    (a, ta), (b, tb), (c, tc) = sorted(runs.items())
    if not (b == a + 1 and c == b + 1) or target < a:
        return None
    pa, pb, pc = _plain(ta), _plain(tb), _plain(tc)
    ins = insertions(pa, pb)
    if ins is None or _insert(pa, ins, 2) != pc:
        return None
    seen: dict[tuple, set] = {}
    for times, tokens in ((0, ta), (1, tb), (2, tc)):
        for site, tok in zip(_sites(len(ta), ins, times), tokens, strict=True):
            if tok[0] == "f":
                seen.setdefault(site, set()).add((tok[3], tok[4]))
    rule: dict[tuple, tuple[str, int]] = {}
    for site, ranks in seen.items():
        newest = {r for r, _ in ranks}
        oldest = {r for _, r in ranks}
        if len(newest) == 1:
            rule[site] = ("new", newest.pop())
        elif len(oldest) == 1:
            rule[site] = ("old", oldest.pop())
        else:
            return None
    times = target - a
    tokens = _insert(pa, ins, times)
    return tokens, [rule.get(site) for site in _sites(len(ta), ins, times)]
