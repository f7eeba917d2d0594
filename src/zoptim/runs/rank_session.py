"""``zoptim rank``: a person steers a colour by ranking candidates, ZO-RankSGD in ask/tell form.

Each round shows ``candidates`` colours around the current one; the person types their indices
best first; ``tell(ranking=...)`` moves the colour. The colour is ``255 * sigmoid(x)`` of a
3-vector ``x``, so any step stays a valid colour. With ``--state FILE`` the session is saved
after every round (written whole, then renamed) and continues from it the next time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from zoptim.methods.ordinal import ZORankSGD


def colour(x: torch.Tensor) -> tuple[int, int, int]:
    r, g, b = (255 * torch.sigmoid(x)).round().int().tolist()
    return r, g, b


def hex_colour(rgb) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _parse(answer: str, n: int) -> list[int] | None:
    try:
        ranking = [int(t) for t in answer.replace(",", " ").split()]
    except ValueError:
        return None
    return ranking if sorted(ranking) == list(range(n)) else None


def _save(path: Path, x: torch.Tensor, opt: ZORankSGD, rounds: int) -> None:
    state = {"x": x.detach().tolist(), "rounds": rounds, "optimizer": opt.state_dict()["zo"]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def session(ask: Callable[[str], str], say: Callable[[str], None], *, rounds: int,
            candidates: int = 4, lr: float = 0.3, eps: float = 0.6, seed: int = 0,
            state: str | None = None) -> tuple[int, int, int]:
    """Run ``rounds`` rounds, asking through ``ask(prompt) -> answer``; returns the colour."""
    x = torch.nn.Parameter(torch.zeros(3))
    opt = ZORankSGD([x], lr=lr, eps=eps, candidates=candidates, seed=seed)
    done = 0
    path = Path(state) if state else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        with torch.no_grad():
            x.copy_(torch.tensor(saved["x"]))
        opt.load_state_dict({**opt.state_dict(), "zo": saved["optimizer"]})
        done = saved["rounds"]
        say(f"continuing from round {done} ({path})")
    for r in range(done, done + rounds):
        opt.ask()
        shown = [colour(x.detach()) for _ in opt.candidates()]
        lines = [f"round {r + 1}: current colour {hex_colour(colour(x.detach()))}"]
        lines += [f"  [{i}] {hex_colour(c)}  rgb{c}" for i, c in enumerate(shown)]
        example = " ".join(map(str, range(candidates)))
        prompt = "\n".join(lines) + f"\nrank them, best first (e.g. {example}): "
        while (ranking := _parse(ask(prompt), candidates)) is None:
            say(f"please give each index 0..{candidates - 1} once, separated by spaces")
        opt.tell(ranking=ranking)
        if path is not None:
            _save(path, x, opt, r + 1)
    final = colour(x.detach())
    say(f"colour after {done + rounds} rounds: {hex_colour(final)} rgb{final}")
    return final
