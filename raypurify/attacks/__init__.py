"""Attacks: one module per attack, one registry. Adding one is a module and a line here."""

from __future__ import annotations

from raypurify.attacks import ar, em, lsp, ntga, ops, random_noise, rem, sep, tap
from raypurify.registry import Registry

ATTACKS = Registry(
    "attack",
    [
        ops.ATTACK,
        lsp.ATTACK,
        ar.ATTACK,
        random_noise.ATTACK,
        em.ATTACK,
        tap.ATTACK,
        rem.ATTACK,
        sep.ATTACK,
        ntga.ATTACK,
    ],
)
