-- upshift:no-transaction
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_user ON orders (user_id);
