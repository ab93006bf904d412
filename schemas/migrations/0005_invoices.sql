-- Finalized invoices, written by `tollgate-billing close`. One invoice per (period, consumer);
-- closing again, or twice at once, never changes it: each close writes its rows with
-- `priority` = 2^64 - 1 - closed_at_us, and ReplacingMergeTree keeps the highest, i.e. the
-- earliest close. Read `invoices FINAL`; exports of a closed period are the stored renderings
-- (`json`, `csv` rows, `html` page), so they are byte-identical whoever reads them.
-- Amounts are exact decimal strings in the currency's minor unit (e.g. '111.11', '10000').
CREATE TABLE IF NOT EXISTS invoices
(
    period String,
    consumer_id String,
    invoice_number String,
    plan_id String,
    currency String,
    total String,
    json String,
    csv String,
    html String,
    closed_at_us UInt64,
    priority UInt64
)
ENGINE = ReplacingMergeTree(priority)
ORDER BY (period, consumer_id);

-- The lines of the finalized invoices, for SQL. Join on closed_at_us with `invoices FINAL` (or
-- read the view) so that only the lines of the close that won are seen.
CREATE TABLE IF NOT EXISTS invoice_lines
(
    period String,
    consumer_id String,
    invoice_number String,
    line UInt16,
    kind String,
    description String,
    quantity String,
    unit_price String,
    amount String,
    currency String,
    source_period String,
    closed_at_us UInt64
)
ENGINE = MergeTree
ORDER BY (period, consumer_id, closed_at_us, line);

CREATE VIEW IF NOT EXISTS invoice_lines_final AS
SELECT * FROM invoice_lines
WHERE (period, consumer_id, closed_at_us) IN (SELECT period, consumer_id, closed_at_us FROM invoices FINAL);
