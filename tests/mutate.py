"""Random edits of a valid text, for the property tests of the parsers (cookie, domain XML)."""

from __future__ import annotations

from hypothesis import strategies as st


def mutate(
    text: str,
    data: st.DataObject,
    chunks: st.SearchStrategy[str],
    *,
    max_edits: int,
    fragments: st.SearchStrategy[str] | None = None,
) -> str:
    """
    *text* after up to *max_edits* edits drawn from *data*, each at a random place: a
    *chunks* text deleted (its length), inserted or written over, or with *fragments*
    also one of them inserted (a piece the parser must refuse cleanly).
    """
    kinds = "dir" if fragments is None else "dirf"
    edit = st.tuples(st.sampled_from(kinds), st.integers(0, 10**9), chunks)
    edits = data.draw(st.lists(edit, max_size=max_edits))
    for kind, pos, chunk in edits:
        pos %= len(text) + 1
        if kind == "d":
            text = text[:pos] + text[pos + len(chunk) :]
        elif kind == "i":
            text = text[:pos] + chunk + text[pos:]
        elif kind == "r":
            text = text[:pos] + chunk + text[pos + len(chunk) :]
        elif fragments is not None:
            text = text[:pos] + data.draw(fragments) + text[pos:]
    return text
