-- corepipe's fleet index (docs/shipping.md, "The fleet index"), read in place by ClickHouse.
-- Replace {{INDEX_URL}} with the index's objects, e.g.
--   https://BUCKET.s3.REGION.amazonaws.com/PREFIX/_index/v1/*/*/*.ndjson.gz
-- and {{ACCESS_KEY}} / {{SECRET_KEY}} with a reader's keys (docs/shipping.md, "Rights"), or use the
-- NOSIGN / named-collection forms of s3(). For Azure, replace the s3(...) call by
--   azureBlobStorage('{{CONNECTION_STRING}}', '{{CONTAINER}}', '{{INDEX_PATH}}', 'LineAsString')
-- with the storage account's connection string, the container and PREFIX/_index/v1/*/*/*.ndjson.gz.
-- The rules are corepipe's own: the rows of objects a compacted object replaces are left out, a row counts
-- only in its own node's partition (tombstones also in node=_prune), a tombstoned crash is left out, a crash
-- listed twice keeps the row of the first object by key, and a crash-site signature joins the one backtrace
-- signature of its site (as `corepipe list --remote --group`). Tested with chdb (tests/e2e/test_fleet_engines.py).

CREATE VIEW fleet_lines AS
SELECT _path AS object, line, JSONExtractString(line, 'kind') AS kind,
       extract(_path, 'node=([^/]+)/[^/]*$') AS partition
FROM s3('{{INDEX_URL}}', '{{ACCESS_KEY}}', '{{SECRET_KEY}}', 'LineAsString');

CREATE VIEW fleet_crashes AS
WITH live AS (
    SELECT * FROM fleet_lines WHERE object NOT IN (
        SELECT concat(replaceRegexpOne(object, '[^/]*$', ''), arrayJoin(JSONExtract(line, 'objects', 'Array(String)')))
        FROM fleet_lines WHERE kind = 'replaces')),
dead AS (
    SELECT DISTINCT JSONExtractString(line, 'node') AS node, JSONExtractString(line, 'id') AS id FROM live
    WHERE kind = 'tombstone' AND (partition = '_prune' OR partition = JSONExtractString(line, 'node')))
SELECT JSONExtractString(line, 'node') AS node, JSONExtractString(line, 'id') AS id,
       JSONExtractString(line, 'time') AS time, JSONExtractFloat(line, 'timestamp') AS timestamp,
       JSONExtractFloat(line, 'received') AS received, JSONExtractString(line, 'exe') AS exe,
       JSONExtractString(line, 'comm') AS comm, JSONExtractString(line, 'signal', 'name') AS signal,
       JSONExtractString(line, 'container', 'runtime') AS runtime, JSONExtractString(line, 'container', 'name') AS container,
       JSONExtractString(line, 'container', 'image') AS image,
       JSONExtractString(line, 'signature', 'hash') AS hash, JSONExtractString(line, 'signature', 'text') AS text,
       JSONExtractString(line, 'signature', 'source') AS source, JSONExtractString(line, 'signature', 'site') AS site,
       JSONExtractString(line, 'core_state') AS core_state, JSONExtractString(line, 'keys', 'record', 'key') AS record,
       object
FROM live
WHERE kind = 'crash' AND partition = node AND (node, id) NOT IN (SELECT node, id FROM dead)
ORDER BY node, id, object
LIMIT 1 BY node, id;

CREATE VIEW fleet_groups AS
WITH sites AS (
    SELECT site, min(hash) AS site_hash, uniqExact(hash) AS n FROM fleet_crashes
    WHERE source = 'backtrace' AND site != '' AND hash != '' GROUP BY site),
keyed AS (
    SELECT c.*, if(c.source = 'crash site' AND s.n = 1, s.site_hash, if(c.hash = '', '-', c.hash)) AS group_key
    FROM fleet_crashes AS c LEFT JOIN sites AS s ON c.site = s.site)
SELECT group_key AS hash, count() AS count, uniqExact(node) AS node_count, arraySort(groupUniqArray(node)) AS nodes,
       min(time) AS first_seen, max(time) AS last_seen
FROM keyed GROUP BY group_key ORDER BY count DESC, hash;

-- Continuous ingest into a ClickHouse server with Keeper (S3Queue or AzureQueue): clickhouse-queue.sql defines
-- fleet_lines over the ingested rows; run it instead of the fleet_lines above, then fleet_crashes and fleet_groups.
