-- Trigger capture at the database's own speed (issue 8).
--
-- 1. Writers no longer NOTIFY on every transaction. PostgreSQL holds a cluster-wide lock from
--    PreCommit_Notify through the commit's WAL flush, so notifying writers commit one at a time
--    (docs/benchmarks.md). A writer now notifies only while the sequencer is *armed*: it armed itself
--    after it found nothing to do for a while and went to sleep. While changes flow the sequencer polls
--    (every few milliseconds) and is disarmed, so writers pay one read of a one-row sequence instead
--    of the lock. The armed flag is a sequence because setval() is visible to every session at once,
--    outside any transaction. `relay.writer_notify` ('auto', the default; 'on' = every transaction,
--    as before; 'off' = never, the poll timer alone) still overrides it per database or role.
--
-- 2. The horizon is per database. `pg_snapshot_xmin(pg_current_snapshot())` is the oldest running
--    transaction of the whole cluster, so a transaction held open in *another database* held back
--    every delivery. Only transactions of this database can write to relay.changelog, so the horizon
--    is now the oldest transaction id still running in this database (pg_stat_activity.backend_xid;
--    prepared transactions from pg_prepared_xacts), or the next transaction id when there is none.
--    A long writer in the same database still holds the horizon back (documented in the README).
--
-- 3. The sequencer's cost per call is flat. It remembers the key (xid, id) of the last change it moved
--    and starts its index range scan there, so the dead tuples that its own deletes leave at the front
--    of the changelog's index are never walked again; autovacuum visits the changelog early.
--    relay.sequence_batch() does not queue behind another node (it returns -1 when another node is
--    sequencing), and tells the caller whether a transaction of this database is still running
--    (`busy`), which is when the caller keeps polling instead of going to sleep.

-- Armed (1) or not (0). Starts armed: the first change after installation wakes a sequencer.
CREATE SEQUENCE relay.wakeup_armed MINVALUE 0 MAXVALUE 1 START 1 NO CYCLE;

-- The last change key moved into the history: the sequencer's index scans start after it. Every
-- change not yet moved has a larger key (changes below the horizon are moved in (xid, id) order, and a
-- change that appears later belongs to a transaction at or above the horizon).
ALTER TABLE relay.sequencer
    ADD COLUMN last_xid xid8 NOT NULL DEFAULT '0',
    ADD COLUMN last_id bigint NOT NULL DEFAULT 0;

-- The changelog is a queue with constant deletes: vacuum it after every few thousand, not after 20 %.
ALTER TABLE relay.changelog SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_vacuum_cost_delay = 0
);

-- Wake the connectors if the sequencer is asleep (see 1.), unless the NOTIFY queue is more than half
-- full: a full queue makes the notifying transaction fail at commit, and the relay must never make an
-- application's write fail. SECURITY DEFINER: a writer's role needs no privilege on the flag.
CREATE OR REPLACE FUNCTION relay.wake() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mode text := coalesce(current_setting('relay.writer_notify', true), '');
BEGIN
    IF mode = 'off' THEN
        RETURN;
    END IF;
    IF mode <> 'on' AND (SELECT last_value FROM relay.wakeup_armed) = 0 THEN
        RETURN;
    END IF;
    IF pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_changes', '');
    END IF;
END
$$;

-- The capture horizon of this database (see 2.): every change with `xid < horizon` that will ever
-- exist is committed (or rolled back) and visible to snapshots taken after this call; `busy` says
-- whether a transaction of this database that holds an id below the next one is still running.
--
-- Order matters: the next id is read first, then the running transactions. A transaction with an id
-- below the next id got it before the first read, so it is either still running at the second read
-- (and counted) or it ended before it (and its changes are visible to every later snapshot).
-- pg_stat_clear_snapshot() makes sure the activity view is read now, not from earlier in the
-- transaction. Transaction ids in pg_stat_activity are 32-bit: each is widened to xid8 relative to the
-- next id (running transactions are always less than 2^31 ids behind it).
CREATE FUNCTION relay.horizon_of_database(OUT horizon xid8, OUT busy boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    next_id bigint;
    oldest bigint;
BEGIN
    next_id := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    PERFORM pg_stat_clear_snapshot();
    SELECT min(next_id + d) INTO oldest
    FROM (
        SELECT CASE WHEN m >= 2147483648 THEN m - 4294967296 ELSE m END AS d
        FROM (
            SELECT ((x::text::bigint - next_id % 4294967296) % 4294967296 + 4294967296) % 4294967296 AS m
            FROM (
                SELECT a.backend_xid AS x FROM pg_stat_activity a
                WHERE a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
                UNION ALL
                SELECT p.transaction FROM pg_prepared_xacts p WHERE p.database = current_database()
            ) xs
        ) ms
    ) ds
    WHERE d < 0;
    busy := oldest IS NOT NULL;
    horizon := coalesce(oldest, next_id)::text::xid8;
END
$$;

-- Move up to `batch_size` changes below this database's horizon from the changelog into the history.
-- moved: how many (-1 when another node is sequencing right now: the caller need not wait for it);
-- busy: a transaction of this database is still running, so more changes may become ready soon;
-- armed: the writers' wake-up is armed after this call; last_seq: the global sequence number after it. With `arm` the call arms it when it moved
-- nothing and nothing is running; the caller must then call once more (a writer may have read the
-- flag just before it was set, and its transaction is running or committed by the next call).
-- Gapless and ordered exactly as before: changes below the horizon, in (xid, id) order, `seq` handed out
-- under the advisory lock, which is held until commit.
CREATE FUNCTION relay.sequence_batch(
    batch_size integer DEFAULT 1000, arm boolean DEFAULT false,
    OUT moved integer, OUT busy boolean, OUT armed boolean, OUT last_seq bigint
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon xid8;
    from_xid xid8;
    from_id bigint;
    is_armed boolean;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('relay.sequence_changes')) THEN
        moved := -1;
        busy := true;
        armed := false;
        SELECT s.last_seq INTO last_seq FROM relay.sequencer s;
        RETURN;
    END IF;
    SELECT h.horizon, h.busy INTO horizon, busy FROM relay.horizon_of_database() h;
    SELECT s.last_xid, s.last_id, s.last_seq INTO from_xid, from_id, last_seq FROM relay.sequencer s;
    SELECT last_value = 1 INTO is_armed FROM relay.wakeup_armed;
    IF NOT EXISTS (
        SELECT 1 FROM relay.changelog c
        WHERE (c.xid, c.id) > (from_xid, from_id) AND c.xid < horizon
    ) THEN
        moved := 0;
        IF arm AND NOT busy AND NOT is_armed THEN
            PERFORM setval('relay.wakeup_armed', 1);
            is_armed := true;
        END IF;
        armed := is_armed;
        RETURN;
    END IF;
    IF is_armed THEN
        PERFORM setval('relay.wakeup_armed', 0);
    END IF;
    armed := false;
    WITH batch AS MATERIALIZED (
        SELECT c.xid, c.id, c.channel, c.data, c.info, c.written_at,
               row_number() OVER (ORDER BY c.xid, c.id) AS grn,
               row_number() OVER (PARTITION BY c.channel ORDER BY c.xid, c.id) AS rn
        FROM (
            SELECT * FROM relay.changelog l
            WHERE (l.xid, l.id) > (from_xid, from_id) AND l.xid < horizon
            ORDER BY l.xid, l.id
            LIMIT batch_size
        ) c
    ), counts AS (
        SELECT channel, count(*) AS n FROM batch GROUP BY channel
    ), tops AS (
        INSERT INTO relay.channels AS ch (name, epoch, top_offset, updated_at)
        SELECT channel, relay.new_epoch(), n, now() FROM counts
        ON CONFLICT (name) DO UPDATE
            SET top_offset = ch.top_offset + EXCLUDED.top_offset, updated_at = now()
        RETURNING name, epoch, top_offset
    ), last_key AS (
        SELECT b.xid, b.id FROM batch b ORDER BY b.grn DESC LIMIT 1
    ), base AS (
        UPDATE relay.sequencer s
        SET last_seq = s.last_seq + (SELECT count(*) FROM batch),
            last_xid = (SELECT k.xid FROM last_key k),
            last_id = (SELECT k.id FROM last_key k)
        RETURNING s.last_seq - (SELECT count(*) FROM batch) AS seq0
    ), moved_rows AS (
        INSERT INTO relay.publications (seq, channel, "offset", epoch, data, info, written_at)
        SELECT base.seq0 + b.grn, b.channel, t.top_offset - c.n + b.rn, t.epoch, b.data, b.info,
               b.written_at
        FROM batch b
        JOIN counts c ON c.channel = b.channel
        JOIN tops t ON t.name = b.channel
        CROSS JOIN base
        RETURNING 1
    ), deleted AS (
        DELETE FROM relay.changelog l USING batch b WHERE l.xid = b.xid AND l.id = b.id
    )
    SELECT count(*)::integer INTO moved FROM moved_rows;
    last_seq := last_seq + moved;
    -- Wake the other nodes' readers, unless the NOTIFY queue is half full (their poll timers cover a
    -- skipped wake-up). Writers no longer notify while changes flow, so this lock is uncontended.
    IF moved > 0 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_publications', '');
    END IF;
END
$$;

-- The previous entry point, kept for callers that want to wait for their turn: one batch, or 0.
CREATE OR REPLACE FUNCTION relay.sequence_changes(batch_size integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('relay.sequence_changes'));
    SELECT * INTO r FROM relay.sequence_batch(batch_size, false);
    RETURN greatest(r.moved, 0);
END
$$;
