-- What the published tables look like, as of the last DDL statement: one row per
-- (publication, table), with its name, published columns and key. The event trigger
-- compares the catalog with it after every DDL statement and tells capture what changed.
CREATE TABLE IF NOT EXISTS pgfanout.published_shapes (
    pubname text NOT NULL,
    relid oid NOT NULL,
    table_name text NOT NULL,
    shape text NOT NULL,
    PRIMARY KEY (pubname, relid)
);
-- The key's columns (the primary key, else the replica identity index); NULL in rows
-- recorded before it was kept, until the next comparison fills it.
ALTER TABLE pgfanout.published_shapes ADD COLUMN IF NOT EXISTS key_columns text;
-- An earlier published_now() without key_columns: a function's result type cannot be
-- replaced, only dropped and created again.
DO $do$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc WHERE oid = to_regprocedure('pgfanout.published_now()')
                                       AND NOT 'key_columns' = ANY (proargnames)) THEN
        DROP FUNCTION pgfanout.published_now();
    END IF;
END $do$;

-- The publications' tables now, described as in pgfanout.published_shapes. Without JIT: the
-- planner's estimate for pg_publication_tables (a thousand rows per publication) is past
-- jit_above_cost, and compiling took about 0.6 s of CPU — after every DDL statement.
CREATE OR REPLACE FUNCTION pgfanout.published_now()
RETURNS TABLE (pubname text, relid oid, table_name text, shape text, key_columns text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
    SELECT pt.pubname::text, c.oid, pt.schemaname || '.' || pt.tablename,
           coalesce((SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                       FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                        AND (pt.attnames IS NULL OR a.attname = ANY (pt.attnames))), ''),
           coalesce((SELECT (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.n)
                               FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum)
                       FROM pg_index i
                      WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)
                      ORDER BY i.indisprimary DESC LIMIT 1), '')
      FROM pg_publication_tables pt
      JOIN pg_namespace n ON n.nspname = pt.schemaname
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
$fn$;

-- Compares the publications' tables with pgfanout.published_shapes, brings it up to date and,
-- when `emit`, writes a transactional logical message 'pgfanout.ddl' listing the changes:
-- {"drop": [[publication, table], ...], "copy": [[publication, table], ...]}, where "drop"
-- names tables that left a publication under that name (dropped, renamed, removed) or whose
-- key changed, and "copy" tables whose name, published columns or key changed, or that
-- joined one: a table whose key changed is in both, so devices make it anew. Returns them.
CREATE OR REPLACE FUNCTION pgfanout.sync_published_shapes(emit boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
DECLARE
    changes jsonb;
BEGIN
    WITH now AS (SELECT * FROM pgfanout.published_now())
    SELECT jsonb_build_object(
               'drop', coalesce((SELECT jsonb_agg(jsonb_build_array(s.pubname, s.table_name) ORDER BY s.table_name)
                                   FROM pgfanout.published_shapes s
                                  WHERE NOT EXISTS (SELECT 1 FROM now p
                                                     WHERE p.pubname = s.pubname AND p.relid = s.relid
                                                       AND p.table_name = s.table_name
                                                       AND p.key_columns = coalesce(s.key_columns, p.key_columns))), '[]'),
               'copy', coalesce((SELECT jsonb_agg(jsonb_build_array(p.pubname, p.table_name) ORDER BY p.table_name)
                                   FROM now p
                                  WHERE NOT EXISTS (SELECT 1 FROM pgfanout.published_shapes s
                                                     WHERE p.pubname = s.pubname AND p.relid = s.relid
                                                       AND p.table_name = s.table_name AND p.shape = s.shape
                                                       AND p.key_columns = coalesce(s.key_columns, p.key_columns))), '[]'))
      INTO changes;
    IF changes = '{"drop": [], "copy": []}'::jsonb
       AND NOT EXISTS (SELECT 1 FROM pgfanout.published_shapes WHERE key_columns IS NULL) THEN
        RETURN changes;
    END IF;
    -- Row by row, so that concurrent statements on different tables do not conflict.
    DELETE FROM pgfanout.published_shapes s
     WHERE NOT EXISTS (SELECT 1 FROM pgfanout.published_now() p WHERE p.pubname = s.pubname AND p.relid = s.relid);
    INSERT INTO pgfanout.published_shapes AS s (pubname, relid, table_name, shape, key_columns)
    SELECT p.pubname, p.relid, p.table_name, p.shape, p.key_columns FROM pgfanout.published_now() p
    ON CONFLICT (pubname, relid) DO UPDATE
        SET table_name = excluded.table_name, shape = excluded.shape, key_columns = excluded.key_columns
      WHERE (s.table_name, s.shape, s.key_columns) IS DISTINCT FROM (excluded.table_name, excluded.shape, excluded.key_columns);
    IF emit AND changes <> '{"drop": [], "copy": []}'::jsonb THEN
        PERFORM pg_logical_emit_message(true, 'pgfanout.ddl', changes::text);
    END IF;
    RETURN changes;
END
$fn$;

-- The event trigger's function: never makes a user's statement fail (a problem here is a
-- warning, and the statement goes on as without pgfanout).
CREATE OR REPLACE FUNCTION pgfanout.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM pgfanout.sync_published_shapes(true);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgfanout: the change of the published tables was not recorded for devices: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END
$fn$;
