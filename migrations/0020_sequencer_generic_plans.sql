-- relay.sequence_batch() plans its statements once per connection instead of on every call.
--
-- PL/pgSQL caches each statement's plan, but a statement with parameters (here the function's
-- variables: the last moved key, the horizon, the batch size) gets a "custom" plan, planned afresh
-- with the values of the call, until a generic plan is estimated to cost no more than the custom
-- ones. For the batch statement (a dozen CTEs) the generic estimate never wins, so every call
-- planned it again: a profile of a connection calling relay.sequence_batch(10) found 46 % of its
-- time in GetCachedPlan, 39 % in the planner (docs/benchmarks.md). Now:
-- - plan_cache_mode = force_generic_plan: every statement is planned once per connection (and
--   again only when the catalog or the statistics of a table it reads change);
-- - enable_seqscan = off: a generic plan is made with the statistics of its time, and one made while
--   relay.changelog looked empty would scan the whole table on every call once the queue's dead
--   rows pile up (the case migration 0019 fixed for custom plans). The function reads the changelog
--   and relay.channels only by their keys; with sequential scans priced out, its plans use the
--   indexes whatever the statistics said (relay.sequencer and relay.wakeup_armed have one row and
--   are still read by a sequential scan, the only path they have);
-- - jit = off: priced-out scans make every plan's estimated cost exceed jit_above_cost, and
--   compiling a plan to machine code costs tens of milliseconds per call (measured: 8 to 160 ms per
--   call). The function's statements are small, so JIT never pays for itself here anyway.
-- These settings apply while the function runs (and to what it calls), never to the caller's
-- session. A later CREATE OR REPLACE FUNCTION relay.sequence_batch() drops them unless it restates
-- them. The function's body and signature are unchanged. connector/tests/sequencer_scans.rs
-- checks both cases: statistics taken while changes were pending, and plans made while the
-- changelog was empty.

ALTER FUNCTION relay.sequence_batch(integer, boolean)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET jit = off;
