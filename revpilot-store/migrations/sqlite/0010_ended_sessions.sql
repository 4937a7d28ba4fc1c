-- Sessions ended by logging out, shared by every server on the database, kept until the session's
-- token would have expired anyway (microseconds since the epoch).
CREATE TABLE ended_sessions (
    session_id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT;

CREATE INDEX ended_sessions_expiry ON ended_sessions (expires_at);
