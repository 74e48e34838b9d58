-- The EC2-compatible API: tags, user data, reservations and launch details of instances.

CREATE TABLE tags (
    project_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (resource_id, key)
);
CREATE INDEX tags_project ON tags(project_id, resource_id);

-- Base64 user data as the client sent it (the metadata service serves it decoded).
ALTER TABLE instances ADD COLUMN user_data TEXT;
-- One reservation per RunInstances call; NULL for instances created elsewhere.
ALTER TABLE instances ADD COLUMN reservation_id TEXT;
ALTER TABLE instances ADD COLUMN launch_index BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN client_token TEXT;
CREATE INDEX instances_reservation ON instances(reservation_id);
