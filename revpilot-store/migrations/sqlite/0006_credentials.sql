-- Built-in accounts (issue #7): an argon2id password hash (PHC string) per user; the email is
-- the profile's.
CREATE TABLE user_credentials (
    user_id       TEXT PRIMARY KEY REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
) STRICT;
