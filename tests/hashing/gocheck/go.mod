module dynamo-snapshot/gocheck

go 1.22
