-- Example tables and the publication pgfanout captures, for deploy/compose.yaml: the
-- postgres image runs this once, when it initialises an empty data directory.
--
-- They are the tables of `pgfanout demo`'s sample workload (src/workload.rs), so the
-- README's `submit` examples work as written. In your own database, publish your own
-- tables instead; every published table needs a primary key.

CREATE TABLE IF NOT EXISTS public.items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    qty integer NOT NULL,
    price numeric(12,2),
    tags jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.sites (
    code text PRIMARY KEY,
    city text,
    active boolean NOT NULL DEFAULT true,
    lat double precision,
    payload bytea
);

-- The name must match PGFANOUT_PUBLICATION (default pgfanout).
CREATE PUBLICATION pgfanout FOR TABLE public.items, public.sites;
