-- Read-your-writes and history bounded exactly as retention promises.
--
-- A publish is acknowledged only once its publication is in the history. The connector takes a fence
-- right after the write committed (relay.write_fence()) and waits until relay.fence_passed() says
-- that everything committed before the fence is sequenced:
-- - `trigger` mode: the fence is the xmax of a snapshot taken after the commit, so the write's xid is
--   below it; it has passed when no committed changelog row below it is left to sequence (the rows
--   behind the sequencer's position are gone, so the check is the same key-range probe the
--   sequencer makes);
-- - `wal` mode: the fence is the LSN of a transactional logical message written after the commit; the
--   leader applies transactions in commit order and stores the end LSN of the last one it applied
--   in the same transaction as their publications, so a stored position beyond the message's LSN
--   means every transaction committed before it is in the history.
--
-- History reads take the channel's retention limits (count and age) and never return a publication
-- beyond them, so recovery and `since` answer as if the history had been trimmed at publish time;
-- the pruning task only reclaims the storage.

CREATE FUNCTION relay.write_fence() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF relay.current_capture_mode() = 'wal' THEN
        RETURN 'lsn:' || pg_logical_emit_message(true, 'relay-fence', '')::text;
    END IF;
    RETURN 'xid:' || pg_snapshot_xmax(pg_current_snapshot())::text;
END
$$;

CREATE FUNCTION relay.fence_passed(fence text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    upto xid8;
    at pg_lsn;
BEGIN
    IF fence LIKE 'lsn:%' THEN
        at := substr(fence, 5)::pg_lsn;
        RETURN coalesce((SELECT w.lsn > at FROM relay.wal_state w), false);
    ELSIF fence LIKE 'xid:%' THEN
        upto := substr(fence, 5)::xid8;
        RETURN NOT EXISTS (
            SELECT 1 FROM relay.changelog c, relay.sequencer s
            WHERE (c.xid, c.id) > (s.last_xid, s.last_id) AND c.xid < upto
        );
    END IF;
    RAISE EXCEPTION 'relay.fence_passed: not a fence: %', fence;
END
$$;

-- The history read of the connector: relay.read_publications (migration 0009, which it replaces)
-- bounded by the channel's retention: only the newest `keep_count` offsets, and only publications
-- sequenced within the last `keep_secs` seconds. The two directions are two loops so that each
-- scans the (channel, offset) index in its own order and stops at the byte cap.
DROP FUNCTION relay.read_publications(text, bigint, boolean, bigint, bigint);

CREATE FUNCTION relay.read_history(
    channel_name text, from_offset bigint, forward boolean, max_rows bigint, max_bytes bigint,
    keep_count bigint, keep_secs bigint
) RETURNS TABLE ("offset" bigint, data text, info text)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    r record;
    total bigint := 0;
    floor_offset bigint;
    cutoff timestamptz;
BEGIN
    IF max_rows <= 0 THEN
        RETURN;
    END IF;
    SELECT greatest(c.top_offset - keep_count, 0) INTO floor_offset
    FROM relay.channels c WHERE c.name = channel_name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    cutoff := clock_timestamp() - make_interval(secs => keep_secs);
    IF forward THEN
        FOR r IN
            SELECT p."offset" AS o, p.data::text AS d, p.info::text AS i FROM relay.publications p
            WHERE p.channel = channel_name AND p."offset" > greatest(from_offset, floor_offset)
              AND p.sequenced_at >= cutoff
            ORDER BY p."offset" LIMIT max_rows
        LOOP
            "offset" := r.o; data := r.d; info := r.i;
            RETURN NEXT;
            total := total + octet_length(r.d) + coalesce(octet_length(r.i), 0);
            EXIT WHEN total > max_bytes;
        END LOOP;
    ELSE
        FOR r IN
            SELECT p."offset" AS o, p.data::text AS d, p.info::text AS i FROM relay.publications p
            WHERE p.channel = channel_name AND p."offset" < from_offset
              AND p."offset" > floor_offset AND p.sequenced_at >= cutoff
            ORDER BY p."offset" DESC LIMIT max_rows
        LOOP
            "offset" := r.o; data := r.d; info := r.i;
            RETURN NEXT;
            total := total + octet_length(r.d) + coalesce(octet_length(r.i), 0);
            EXIT WHEN total > max_bytes;
        END LOOP;
    END IF;
END
$$;
