-- Sessions ended by logging out, shared by every server on the database, kept until the session's
-- token would have expired anyway.
CREATE TABLE ended_sessions (
    session_id TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX ended_sessions_expiry ON ended_sessions (expires_at);
