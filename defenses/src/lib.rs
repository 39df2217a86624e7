//! Defenses (see issue: defenses). Nothing here yet.
