-- The example application of the seed: an editable chat. The writer Lambda inserts and edits rows; the
-- connector's generated trigger turns each change into a publication on `incoming-chat`.

CREATE TABLE IF NOT EXISTS public.chat_data (
    msg_id                text        PRIMARY KEY,
    username              text        NOT NULL,
    msg_data              text        NOT NULL,
    client_id             text        NOT NULL,
    incremental_record_id bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at_timestamp  bigint      NOT NULL,
    is_edited             boolean     NOT NULL DEFAULT false,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Message ids the writer has processed: a Lambda is retried at least once on error, so each event is
-- applied at most once, whatever its kind (an edit replayed after a later edit must not revert it).
CREATE TABLE IF NOT EXISTS public.chat_processed_messages (
    message_id   text        PRIMARY KEY,
    name         text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
