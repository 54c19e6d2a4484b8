-- Disjoint identity namespaces for chat authors (issue 9, item 5). A row's author is the pair
-- (client_kind, client_id): `user` (client_id is the token's `sub`), `anonymous` (client_id is the
-- connector's id of an anonymous connection), `server` (the server API). An edit applies only when both
-- match, so a token whose `sub` equals an anonymous client's id (visible in every row) cannot edit that
-- person's messages. Rows written before this migration cannot be told apart: they are `legacy`, and only
-- an envelope without `clientKind` (never sent by this connector) matches them.
ALTER TABLE public.chat_data
    ADD COLUMN IF NOT EXISTS client_kind text NOT NULL DEFAULT 'legacy'
        CONSTRAINT chat_data_client_kind_check CHECK (client_kind IN ('user', 'anonymous', 'server', 'legacy'));
