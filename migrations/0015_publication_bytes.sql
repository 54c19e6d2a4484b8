-- Publication data keeps the text it was published with. Centrifugo forwards a publication's data
-- byte for byte, and the SDKs (Protobuf ones in particular) compare the bytes they get with the bytes
-- they sent; `jsonb` rewrote them (spacing, key order, duplicate keys). The history and the changelog
-- now store `json` (validated text, kept as given). Rows captured from tables are still built with the
-- jsonb functions (their text is PostgreSQL's, as before); what is published with relay.publish() or
-- relay.publish_json() comes back exactly as written, except that a value spread over several lines
-- is put on one (JSON-protocol frames are newline-delimited): its text is then jsonb's.
--
-- Upgrading rewrites relay.publications (ALTER COLUMN TYPE holds an exclusive lock for the rewrite):
-- on a large history, run it when writes can wait that long.
ALTER TABLE relay.changelog ALTER COLUMN data TYPE json USING data::json;
ALTER TABLE relay.publications ALTER COLUMN data TYPE json USING data::json;

-- Publishes `data` on `channel` as written (see above). In `wal` mode a transactional logical
-- message (the leader reads it from the slot in commit order), in `trigger` mode a changelog row.
CREATE FUNCTION relay.publish_json(channel text, data json, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    text_of text := data::text;
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'relay.publish: channel must not be empty';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'relay.publish: data must not be NULL';
    END IF;
    IF strpos(text_of, E'\n') > 0 OR strpos(text_of, E'\r') > 0 THEN
        data := data::jsonb::json;
    END IF;
    IF relay.current_capture_mode() = 'wal' THEN
        PERFORM pg_logical_emit_message(
            true, 'relay', json_build_object('channel', channel, 'data', data, 'info', info)::text);
    ELSE
        INSERT INTO relay.changelog (channel, data, info) VALUES (channel, data, info);
        PERFORM relay.wake();
    END IF;
END
$$;

-- relay.publish() keeps its signature (SQL callers pass jsonb, or literals that resolve to it) and
-- goes through relay.publish_json(); its data's text is jsonb's, as before.
CREATE OR REPLACE FUNCTION relay.publish(channel text, data jsonb, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM relay.publish_json(channel, data::json, info);
END
$$;

DROP FUNCTION relay.publish_changelog(text, jsonb, jsonb);

-- relay.wal_apply() (migration 0008, kept for a node of an earlier version during a rolling deploy)
-- still casts its data to jsonb: such a node's publications get jsonb's text, stored as json.
