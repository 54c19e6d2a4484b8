-- Capture triggers are owned per mapping, and every running node says which ones it needs.
--
-- A capture trigger's name comes from a hash of its mapping's definition (relay_<hash>), so nodes whose
-- configurations differ (two versions during a rolling deploy) install different triggers side by side.
-- Each node registers the triggers of its mappings here and renews the entry while it runs; a trigger
-- sync (a node's start-up, `connector triggers sync`) drops only relay capture triggers that neither
-- its own configuration nor a live entry names. An entry expires if its node stops renewing it (killed
-- node); a node that shuts down removes its entry.

CREATE TABLE relay.capture_owners (
    node         text        PRIMARY KEY,
    -- 'schema.table.trigger' of every capture trigger the node's mappings need.
    triggers     text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
