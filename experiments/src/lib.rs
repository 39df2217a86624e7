//! Study files, runner, store and report (see issue: experiment runner). Nothing here yet.
