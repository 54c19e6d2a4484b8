-- History retention. The connector's pruning task calls relay.prune_channel() for each channel with the
-- limits of the retention rule that matches it. Pruning deletes only old publications (never the
-- changelog, never a row a writer touches), in small batches, so it never blocks writers.
--
-- A channel remembers the signature of the rule it was last pruned with: when the rule changes, the
-- channel gets a new epoch, so clients positioned in the old stream get `recovered: false` rather than a
-- history that silently follows other limits. relay.reset_channel() empties a channel's history and gives
-- it a new epoch.

ALTER TABLE relay.channels ADD COLUMN retention text;

CREATE FUNCTION relay.prune_channel(
    channel_name text, max_publications bigint, max_age_secs bigint, signature text,
    batch_size integer DEFAULT 5000
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    top bigint;
    stored text;
    upto bigint;
    by_age bigint;
    n bigint;
    total bigint := 0;
BEGIN
    SELECT c.top_offset, c.retention INTO top, stored FROM relay.channels c WHERE c.name = channel_name;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF stored IS DISTINCT FROM signature THEN
        UPDATE relay.channels
        SET retention = signature,
            epoch = CASE WHEN stored IS NULL THEN epoch ELSE relay.new_epoch() END
        WHERE name = channel_name;
    END IF;

    upto := top - max_publications;
    -- Offsets grow with time within a channel: everything up to the newest too-old one goes.
    SELECT max(p."offset") INTO by_age FROM relay.publications p
    WHERE p.channel = channel_name AND p.sequenced_at < clock_timestamp() - make_interval(secs => max_age_secs);
    upto := greatest(upto, coalesce(by_age, 0));
    IF upto <= 0 THEN
        RETURN 0;
    END IF;
    LOOP
        DELETE FROM relay.publications
        WHERE ctid IN (
            SELECT ctid FROM relay.publications
            WHERE channel = channel_name AND "offset" <= upto
            ORDER BY "offset" LIMIT batch_size
        );
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        EXIT WHEN n < batch_size;
    END LOOP;
    RETURN total;
END
$$;

CREATE FUNCTION relay.reset_channel(channel_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE relay.channels SET epoch = relay.new_epoch(), updated_at = now() WHERE name = channel_name;
    DELETE FROM relay.publications WHERE channel = channel_name;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
