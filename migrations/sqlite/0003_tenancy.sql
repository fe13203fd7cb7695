-- Tenants, members, policies, owner quotas and templates.
-- Members and tenant policies cascade with their tenant; a global policy has a
-- NULL tenant_id.
CREATE TABLE tenants (
    id          TEXT    PRIMARY KEY NOT NULL,
    name        TEXT    NOT NULL,
    owner_id    TEXT    NOT NULL DEFAULT '',
    settings    TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX tenants_owner ON tenants (owner_id);

CREATE TABLE tenant_members (
    tenant_id   TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    role        TEXT    NOT NULL DEFAULT 'viewer' CHECK (role IN ('viewer','operator','admin')),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX tenant_members_user ON tenant_members (user_id);

CREATE TABLE policies (
    id            TEXT    PRIMARY KEY NOT NULL,
    tenant_id     TEXT    REFERENCES tenants (id) ON DELETE CASCADE,
    resource_type TEXT    NOT NULL CHECK (resource_type IN ('image','runtime','network')),
    effect        TEXT    NOT NULL DEFAULT 'allow' CHECK (effect IN ('allow','deny')),
    pattern       TEXT    NOT NULL CHECK (pattern <> ''),
    priority      INTEGER NOT NULL DEFAULT 10,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX policies_tenant ON policies (tenant_id, resource_type);

CREATE TABLE owner_quotas (
    owner_id                 TEXT    PRIMARY KEY NOT NULL,
    max_sandboxes            INTEGER NOT NULL DEFAULT 0 CHECK (max_sandboxes >= 0),
    max_ttl_seconds          INTEGER NOT NULL DEFAULT 0 CHECK (max_ttl_seconds >= 0),
    max_exec_timeout_seconds INTEGER NOT NULL DEFAULT 0 CHECK (max_exec_timeout_seconds >= 0),
    created_at               INTEGER NOT NULL,
    updated_at               INTEGER NOT NULL
);

CREATE TABLE templates (
    name          TEXT    PRIMARY KEY NOT NULL,
    version       INTEGER NOT NULL DEFAULT 1,
    image         TEXT    NOT NULL,
    description   TEXT    NOT NULL DEFAULT '',
    runtime       TEXT    NOT NULL DEFAULT '',
    setup         TEXT    NOT NULL DEFAULT '[]',
    allowed_hosts TEXT    NOT NULL DEFAULT '[]',
    env           TEXT    NOT NULL DEFAULT '{}',
    memory_mb     INTEGER NOT NULL DEFAULT 512 CHECK (memory_mb >= 0),
    vcpus         INTEGER NOT NULL DEFAULT 1 CHECK (vcpus >= 0),
    ttl_seconds   INTEGER NOT NULL DEFAULT 300 CHECK (ttl_seconds >= 0),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
