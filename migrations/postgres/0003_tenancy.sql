-- Tenants, members, policies, owner quotas and templates (Postgres dialect of
-- migrations/sqlite/0003).
CREATE TABLE tenants (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT        NOT NULL,
    owner_id    TEXT        NOT NULL DEFAULT '',
    settings    TEXT        NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tenants_owner ON tenants (owner_id);

CREATE TABLE tenant_members (
    tenant_id   TEXT        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id     TEXT COLLATE "C" NOT NULL,
    role        TEXT        NOT NULL DEFAULT 'viewer' CHECK (role IN ('viewer','operator','admin')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX tenant_members_user ON tenant_members (user_id);

CREATE TABLE policies (
    id            TEXT COLLATE "C" PRIMARY KEY,
    tenant_id     TEXT        REFERENCES tenants (id) ON DELETE CASCADE,
    resource_type TEXT        NOT NULL CHECK (resource_type IN ('image','runtime','network')),
    effect        TEXT        NOT NULL DEFAULT 'allow' CHECK (effect IN ('allow','deny')),
    pattern       TEXT        NOT NULL CHECK (pattern <> ''),
    priority      BIGINT      NOT NULL DEFAULT 10,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX policies_tenant ON policies (tenant_id, resource_type);

CREATE TABLE owner_quotas (
    owner_id                 TEXT COLLATE "C" PRIMARY KEY,
    max_sandboxes            BIGINT      NOT NULL DEFAULT 0 CHECK (max_sandboxes >= 0),
    max_ttl_seconds          BIGINT      NOT NULL DEFAULT 0 CHECK (max_ttl_seconds >= 0),
    max_exec_timeout_seconds BIGINT      NOT NULL DEFAULT 0 CHECK (max_exec_timeout_seconds >= 0),
    created_at               TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE templates (
    name          TEXT COLLATE "C" PRIMARY KEY,
    version       BIGINT      NOT NULL DEFAULT 1,
    image         TEXT        NOT NULL,
    description   TEXT        NOT NULL DEFAULT '',
    runtime       TEXT        NOT NULL DEFAULT '',
    setup         TEXT        NOT NULL DEFAULT '[]',
    allowed_hosts TEXT        NOT NULL DEFAULT '[]',
    env           TEXT        NOT NULL DEFAULT '{}',
    memory_mb     BIGINT      NOT NULL DEFAULT 512 CHECK (memory_mb >= 0),
    vcpus         BIGINT      NOT NULL DEFAULT 1 CHECK (vcpus >= 0),
    ttl_seconds   BIGINT      NOT NULL DEFAULT 300 CHECK (ttl_seconds >= 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
