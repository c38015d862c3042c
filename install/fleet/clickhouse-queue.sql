-- corepipe's fleet index (docs/shipping.md, "The fleet index") ingested continuously by a ClickHouse server with
-- Keeper: each new index object is read once, as it appears, into fleet_index_raw. Run this file, then
-- clickhouse.sql from its `CREATE VIEW fleet_crashes` on (its fleet_lines reads the bucket in place; this one
-- reads the ingested table instead). Replace {{INDEX_URL}}, {{ACCESS_KEY}} and {{SECRET_KEY}} as clickhouse.sql
-- says. For Azure, replace the S3Queue(...) call by
--   AzureQueue('{{CONNECTION_STRING}}', '{{CONTAINER}}', '{{INDEX_PATH}}', 'LineAsString')
-- with the storage account's connection string, the container and PREFIX/_index/v1/*/*/*.ndjson.gz; the
-- settings and everything else stay. Tested with chdb and its in-memory Keeper against SeaweedFS (S3Queue)
-- and Azurite (AzureQueue) (tests/e2e/test_fleet_engines.py).
--
-- The queue sees new objects, never deletions or replacements: the rows of the small objects a compaction merged
-- stay in fleet_index_raw beside the merged object's, and clickhouse.sql's rules leave them out (the merged
-- object's `replaces` row names them), exactly as they leave out a tombstoned crash. So keep `object` and `line`
-- as they are. mode 'unordered' because a new object can sort before one already read (a crash of a past day,
-- a compacted day); 'ordered' would skip it. Every object read is one Keeper node until tracked_files_limit:
-- past it, ClickHouse forgets the oldest and reads those still in the bucket again (its S3Queue docs,
-- tracked_files_limit); the rules keep one row per crash, so that only grows fleet_index_raw. Keep the limit
-- above the index's object count (docs/shipping.md, "Compaction": at most one object per node and dump day).
-- Each poll lists the whole index prefix; an idle queue polls less and less often, here at least once a minute
-- (ClickHouse 26's default is ten minutes), so a new object is read within about a minute.

CREATE TABLE fleet_index_raw (object String, line String) ENGINE = MergeTree ORDER BY object;

CREATE TABLE fleet_index_queue (line String)
    ENGINE = S3Queue('{{INDEX_URL}}', '{{ACCESS_KEY}}', '{{SECRET_KEY}}', 'LineAsString')
    SETTINGS mode = 'unordered', keeper_path = '/clickhouse/corepipe/fleet_index', tracked_files_limit = 1000000,
             polling_max_timeout_ms = 60000;

CREATE MATERIALIZED VIEW fleet_index_ingest TO fleet_index_raw AS SELECT _path AS object, line FROM fleet_index_queue;

CREATE VIEW fleet_lines AS
SELECT object, line, JSONExtractString(line, 'kind') AS kind, extract(object, 'node=([^/]+)/[^/]*$') AS partition
FROM fleet_index_raw;
