package hetzner

import (
	"fmt"
	"io"
	"text/tabwriter"
)

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func id(i int64) string {
	if i == 0 {
		return "-"
	}
	return fmt.Sprint(i)
}

// WriteServerTable writes provisioning results as a table.
func WriteServerTable(w io.Writer, rs []ServerResult) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tIPV4\tIPV6\tPRIVATE IP\tSTATUS\tRESULT")
	for _, r := range rs {
		res := string(r.Outcome)
		if r.Error != "" {
			res += ": " + r.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, id(r.ID), dash(r.IPv4), dash(r.IPv6), dash(r.PrivateIP), dash(r.Status), res)
	}
	return tw.Flush()
}

// WriteDestroyTable writes destroy results as a table.
func WriteDestroyTable(w io.Writer, rs []DestroyResult) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tSERVER\tKEYS DELETED\tRESULT")
	for _, r := range rs {
		srv := "kept"
		switch {
		case r.ServerDeleted:
			srv = "deleted"
		case r.ID == 0:
			srv = "none"
		}
		res := string(r.Outcome)
		if r.Error != "" {
			res += ": " + r.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", r.Name, id(r.ID), srv, r.KeysDeleted, res)
	}
	return tw.Flush()
}

// WriteInventoryTable writes the cloud/registry inventory as a table.
func WriteInventoryTable(w io.Writer, rows []InventoryRow) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSERVER\tSTATUS\tROLE\tIPV4\tPRIVATE IP\tSUBNET\tOVERLAY IP\tAPPLIED\tSTATE")
	for _, r := range rows {
		applied := "-"
		if r.Applied > 0 {
			applied = fmt.Sprint(r.Applied)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, id(r.ServerID), dash(r.ServerStatus), dash(r.Role),
			dash(r.IPv4), dash(r.PrivateIP), dash(r.Subnet), dash(r.OverlayIP), applied, r.State)
	}
	return tw.Flush()
}
