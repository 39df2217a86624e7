//! Attacks (see issue: attack suite). Nothing here yet.
